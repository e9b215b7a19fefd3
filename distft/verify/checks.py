"""The equivalence checks. Each compares real runs (started by `runs.run`) of a shrunk copy of the
user's config, or the artefacts one of them wrote, and returns a `Check` with the measured
difference and the tolerance it was held to."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from distft.dtypes import PRECISION_DTYPES
from distft.verify import runs

# Relative loss tolerance by precision: fp32 runs agree to rounding; mixed precision does not.
LOSS_TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
EOS_MIN_FRACTION = 0.75  # of training prompts whose greedy generation ends with EOS


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not applicable to this config
    measured: str
    tolerance: str
    detail: str = ""


def rel_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    worst = 0.0
    for s in steps:
        if s not in a or s not in b:
            return math.inf
        worst = max(worst, abs(a[s] - b[s]) / max(abs(b[s]), 1e-12))
    return worst


def compare_losses(name: str, run: Path, ref: Path, steps, tol: float, what: str) -> Check:
    a, b = runs.losses(run), runs.losses(ref)
    if not a:
        return Check(name, False, "run failed", f"{tol:g} rel", runs.log_tail(run))
    d = rel_diff(a, b, steps)
    detail = f"{what}; steps {min(steps)}-{max(steps)}"
    return Check(name, d <= tol, f"{d:.2e} rel", f"{tol:g} rel", detail)


def compare_exports(name: str, run: Path, ref: Path, tol: float, what: str) -> Check:
    """The two runs' exported weights within `tol` of the largest: the full weights, or for an
    adapter its merged weights (export/merged: what the adapter does to the base; its low-rank
    factors themselves are not unique enough to compare, as Adam scales a component whose gradient
    is near zero by that gradient's rounding), with the adapter files' tensors of the same names
    and shapes."""
    from safetensors.torch import load_file

    adapter = (ref / "export" / "adapter_model.safetensors").is_file()
    weights = "merged/model.safetensors" if adapter else "model.safetensors"
    files = [weights, *(["adapter_model.safetensors"] if adapter else [])]
    if missing := [
        str(r / "export" / f) for r in (run, ref) for f in files if not (r / "export" / f).is_file()
    ]:
        return Check(name, False, "not exported", "-", f"{what}; missing {missing[0]}")
    for f in reversed(files):  # the weights compared last, still loaded
        a, b = (load_file(str(r / "export" / f)) for r in (run, ref))
        if {k: v.shape for k, v in a.items()} != {k: v.shape for k, v in b.items()}:
            diff = sorted(a.keys() ^ b.keys()) or [k for k in a if a[k].shape != b[k].shape]
            return Check(name, False, "different tensors", "-", f"{f}: {diff[:4]}")
    d = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    d /= max(max(float(b[k].float().abs().max()) for k in b), 1e-12)
    detail = f"{what}; exported {weights}" + (" (adapter merged)" if adapter else "")
    return Check(name, d <= tol, f"{d:.2e} rel weights", f"{tol:g} rel", detail)


def _load_exported(export: Path, cfg):
    """The export, as a user would load it: full weights, or the PEFT adapter on its base (loaded
    the way training loaded it, e.g. 4-bit for QLoRA)."""
    import transformers

    from distft.tuning import TUNINGS

    meta = json.loads((export / "distft_export.json").read_text())
    if meta.get("adapter"):
        from peft import PeftConfig, PeftModel

        dtype = PRECISION_DTYPES[cfg.train.precision]
        kwargs = TUNINGS[cfg.tuning.name].load_kwargs(cfg, dtype)
        base_path = PeftConfig.from_pretrained(str(export)).base_model_name_or_path
        arch = transformers.AutoConfig.from_pretrained(base_path).architectures[0]
        base = getattr(transformers, arch).from_pretrained(base_path, dtype=torch.float32, **kwargs)
        return PeftModel.from_pretrained(base, str(export)), meta
    arch = transformers.AutoConfig.from_pretrained(str(export)).architectures[0]
    return getattr(transformers, arch).from_pretrained(str(export), dtype=torch.float32), meta


def check_export(cfg, run: Path) -> Check:
    """export/ exists, its adapter (if any) is not empty and has trained (non-zero-update)
    tensors, and the loaded export reproduces the logits recorded from the trained model."""
    export = run / "export"
    if not (export / "distft_export.json").is_file():
        return Check("export loadable", False, "no export/", "-", runs.log_tail(run))
    model, meta = _load_exported(export, cfg)
    detail = "full weights"
    if meta.get("adapter"):
        from safetensors.torch import load_file

        files = list(export.glob("adapter_model*.safetensors"))
        tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
        if not tensors or all(v.numel() == 0 for v in tensors.values()):
            return Check("export loadable", False, "empty adapter", "> 0 tensors", str(export))
        detail = f"adapter: {len(tensors)} tensors, {sum(v.numel() for v in tensors.values()):,} values"
    ids = torch.tensor(meta["probe_input_ids"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().flatten()[:512]
    want = torch.tensor(meta["probe_logits"])
    d = float((logits - want).abs().max()) / max(float(want.abs().max()), 1e-12)
    tol = {"fp32": 1e-4}.get(cfg.train.precision, 5e-2)  # the export's own self-check tolerance
    return Check("export loadable", d <= tol, f"{d:.2e} rel logits", f"{tol:g} rel", detail)


def _prompts_and_eos(cfg, run: Path, n: int) -> tuple[list[list[int]], int | None, object]:
    """The first training examples' prompts (tokens before the first target) and the EOS id."""
    from distft.data.pipeline import prepare_cached
    from distft.data.sft_format import IGNORE
    from distft.methods import METHODS
    from distft.models import load_tokenizer

    tok = load_tokenizer(str(run / "export"), cfg)
    method = METHODS[cfg.method.name](cfg, tok)
    data = prepare_cached(cfg, method, tok, run, True, quiet=True)
    prompts = []
    for ex in data.train:
        labels, ids = ex.get("labels"), ex.get("input_ids")
        if labels is None or ids is None or (ex.get("position_ids") or [0, 1])[-1] + 1 != len(ids):
            continue  # not a plain one-example row (packed, or not a token-label row)
        first = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
        if first:
            prompts.append(ids[:first])
        if len(prompts) == n:
            break
    return prompts, tok.eos_token_id, tok


def check_eos(cfg, run: Path, n: int = 8) -> Check:
    """After training on a few examples until they are learnt, greedy generation from the export
    on those training prompts ends with EOS (EOS was a training target)."""
    if not (run / "export" / "distft_export.json").is_file():
        return Check("EOS trained", False, "run failed", "-", runs.log_tail(run))
    prompts, eos, _ = _prompts_and_eos(cfg, run, n)
    if not prompts or eos is None:
        return Check("EOS trained", None, "n/a", "-", "no prompt/completion rows or no EOS token")
    model, _ = _load_exported(run / "export", cfg)
    model.eval()
    hits = 0
    with torch.no_grad():
        for p in prompts:
            out = model.generate(
                input_ids=torch.tensor([p]),
                max_new_tokens=cfg.data.max_length,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            hits += int(eos in out[0, len(p) :].tolist())
    frac = hits / len(prompts)
    return Check(
        "EOS trained",
        frac >= EOS_MIN_FRACTION,
        f"{hits}/{len(prompts)} end with EOS",
        f">= {EOS_MIN_FRACTION:.0%}",
        "greedy generation from export/ on training prompts",
    )


def check_packing(cfg, run: Path) -> Check:
    """The same examples, packed into shared rows (position ids restart per example) and unpacked
    (one per row): the loss per target token must match (no attention across examples)."""
    from distft.data.collate import pack
    from distft.data.pipeline import prepare_cached
    from distft.methods import METHODS
    from distft.models import load_model, load_tokenizer

    model_dir = run / "base_model" if (run / "base_model").is_dir() else Path(cfg.model.name_or_path or "")
    tok = load_tokenizer(str(model_dir), cfg)
    method = METHODS[cfg.method.name](cfg, tok)
    data = prepare_cached(cfg, method, tok, run, True, quiet=True)
    rows = [r for r in data.val if {"input_ids", "labels", "position_ids"} <= set(r)][:16]
    if len(rows) < 2:
        why = f"method={cfg.method.name} rows are not packable"
        return Check("packing = no packing", None, "n/a", "-", why)
    examples = [SimpleNamespace(input_ids=r["input_ids"], labels=r["labels"]) for r in rows]
    packed = pack(examples, cfg.data.max_length)
    model = load_model(str(model_dir), cfg, torch.float32, {}, method.auto_class)
    model.eval()
    out = []
    with torch.no_grad():
        for batch_rows in (rows, packed):
            batch = method.collate(batch_rows)
            loss, _ = method.loss(model, batch)
            out.append(float(loss) / max(batch["num_targets"], 1))
    d = abs(out[0] - out[1]) / max(abs(out[0]), 1e-12)
    tol = 1e-5  # fp32 forward; attention leaking across examples moved it by 2e-4 on the tiny model
    detail = f"{len(rows)} examples in {len(rows)} rows vs {len(packed)} packed rows"
    return Check("packing = no packing", d <= tol, f"{d:.2e} rel loss/token", f"{tol:g} rel", detail)
