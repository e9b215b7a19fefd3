"""Adapter tools on exported PEFT adapters: merge into the base, and combine several into one.

- `merge`: LoRA/DoRA/IA3 adapter + its base → full weights. A QLoRA adapter was trained against
  the 4-bit (NF4) base, not the original weights, so its base is loaded in 4-bit exactly as in
  training and dequantized (transformers `dequantize`), the adapter merged in fp32 and the result
  saved in bf16, with a warning about what that costs.
- `combine`: several LoRA adapters of the same base → one adapter, through PEFT's
  `add_weighted_adapter` (linear, cat, svd, ties, dare_ties, dare_linear, magnitude_prune, ...).

The base is the adapter's `base_model_name_or_path` unless given; a distft export of the generated
tiny base carries a copy in `base/`, used when the export has been moved. A sequence-classification
adapter (method=classify, reward) gets its head's size and label names from distft_export.json or
from the saved head.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from distft.dtypes import PRECISION_DTYPES
from distft.errors import ConfigError, DistftError

# PEFT types whose adapters are inputs (virtual tokens, prompts), not weight deltas.
UNMERGEABLE = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING"}
COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
NEEDS_DENSITY = {c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude"))}
QLORA_WARNING = (
    "merging a QLoRA adapter: the adapter was trained against the 4-bit ({quant}) base, so it is merged "
    "into that base dequantized, not into the original weights. The merged model is saved in {dtype}: "
    "it reproduces the trained model up to {dtype} rounding but differs from the original base by the "
    "4-bit quantization error everywhere, and quantizing it to 4-bit again loses part of the adapter's "
    "update. To serve a 4-bit base, keep the adapter unmerged."
)


def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(adapter_config.json, distft_export.json or {}) of an adapter directory."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise ConfigError(
            f"{p} is not a PEFT adapter directory (no adapter_config.json); give an adapter run's export/"
        )
    meta_file = p / "distft_export.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return json.loads((p / "adapter_config.json").read_text()), meta


def _run_config(adapter_dir: Path) -> dict:
    """The training run's resolved config (run_dir/config.yaml beside export/), if it is there."""
    path = adapter_dir.parent / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}


def _base_path(adapter_dir: Path, conf: dict, base: str | None) -> str:
    """The base to load: --base, else the adapter's base_model_name_or_path, else (a distft export
    moved away from where it was written) the copy of the base it carries in `base/`."""
    path = base or conf.get("base_model_name_or_path")
    if not path:
        raise ConfigError(f"{adapter_dir}: the adapter names no base model; pass --base")
    carried = adapter_dir / "base"
    if not base and path.startswith(("/", ".")) and not Path(path).is_dir() and carried.is_dir():
        return str(carried.resolve())
    if path.startswith(("/", ".")) and not Path(path).is_dir():
        raise ConfigError(f"{adapter_dir}: its base {path} does not exist (moved?); pass --base")
    return path


def _head_kwargs(adapter_dir: Path, conf: dict, meta: dict) -> dict:
    """Sequence-classification head: label names from the export, else the saved head's size."""
    if conf.get("task_type") != "SEQ_CLS":
        return {}
    if meta.get("id2label"):
        names = [meta["id2label"][k] for k in sorted(meta["id2label"], key=int)]
        return {"num_labels": len(names), "id2label": dict(enumerate(names))} | {
            "label2id": {n: i for i, n in enumerate(names)}
        }
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(("score.weight", "classifier.weight")):
                return {"num_labels": f.get_slice(key).get_shape()[0]}
    raise DistftError(f"{adapter_dir}: a SEQ_CLS adapter without a saved head; cannot tell its label count")


def load_base(adapter_dir: Path, conf: dict, meta: dict, base: str | None, quantization=None):
    """The base model for an adapter, with the right head; `quantization` loads it in 4-bit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = _base_path(adapter_dir, conf, base)
    head = _head_kwargs(adapter_dir, conf, meta)
    kwargs: dict = {"dtype": torch.float32}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if not head:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    config = AutoConfig.from_pretrained(path)
    config.update(head)
    if config.pad_token_id is None:
        config.pad_token_id = _tokenizer(adapter_dir, path).pad_token_id
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)


def _tokenizer(adapter_dir: Path, base_path: str):
    from transformers import AutoTokenizer

    src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _bnb_config(adapter_dir: Path):
    """4-bit settings as in training: the run's tuning.quant_type/double_quant (nf4 + double quant
    when the run config is not beside the adapter)."""
    from transformers import BitsAndBytesConfig

    tuning = _run_config(adapter_dir).get("tuning", {})
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=tuning.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=tuning.get("double_quant", True),
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )


def _dequantized(model):
    """The 4-bit model's weights as fp32 Linear layers (exactly the values the 4-bit layers use)."""
    from bitsandbytes.nn import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            # bitsandbytes repacks weights for CPU inference in eval mode; dequantize the plain form.
            m.support_avx512bf16_for_cpu = False
    return model.dequantize(dtype=torch.float32)


def merge(
    adapter_dir: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str | None = None,
    from_4bit: bool | None = None,
) -> Path:
    """Merge an adapter into its base and save full weights (+ tokenizer) to `out`."""
    from peft import PeftModel

    adapter_dir, out = Path(adapter_dir), Path(out)
    conf, meta = read_adapter(adapter_dir)
    if conf.get("peft_type") in UNMERGEABLE:
        raise ConfigError(
            f"{adapter_dir} is a {conf['peft_type']} adapter: it adds virtual tokens/prompts, not weight "
            "deltas, so there is nothing to merge; load it with PeftModel.from_pretrained instead"
        )
    quantized = bool(meta.get("quantized_base")) if from_4bit is None else from_4bit
    dtype = dtype or ("bf16" if quantized else "fp32")
    if dtype not in PRECISION_DTYPES:
        raise ConfigError(f"dtype={dtype!r}; valid: {', '.join(PRECISION_DTYPES)}")
    if quantized:
        bnb = _bnb_config(adapter_dir)
        model = _dequantized(load_base(adapter_dir, conf, meta, base, bnb))
        warnings.warn(QLORA_WARNING.format(quant=bnb.bnb_4bit_quant_type, dtype=dtype), stacklevel=2)
    else:
        model = load_base(adapter_dir, conf, meta, base)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(PRECISION_DTYPES[dtype])
    base_path = _base_path(adapter_dir, conf, base)
    _save(out, merged, _tokenizer(adapter_dir, base_path))
    info = {
        "merged_from": str(adapter_dir.resolve()),
        "base": base_path,
        "dtype": dtype,
        "dequantized_from_4bit": quantized,
        "adapter": False,
        **{k: meta[k] for k in ("method", "tuning", "id2label") if k in meta},
    }
    (out / "distft_export.json").write_text(json.dumps(info, indent=2))
    return out


def combine(
    adapter_dirs: list[str | Path],
    weights: list[float],
    out: str | Path,
    how: str = "linear",
    density: float | None = None,
    base: str | None = None,
) -> Path:
    """Combine LoRA adapters of one base into a single adapter saved to `out`."""
    from peft import PeftModel

    dirs = [Path(d) for d in adapter_dirs]
    if len(dirs) < 2:
        raise ConfigError("combine needs at least two adapters")
    if len(weights) != len(dirs):
        raise ConfigError(f"{len(dirs)} adapters but {len(weights)} weights; give one weight per adapter")
    if how not in COMBINATIONS:
        raise ConfigError(f"combination {how!r}; valid: {', '.join(COMBINATIONS)}")
    if how in NEEDS_DENSITY and density is None:
        density = 0.5
    if density is not None and not 0.0 < density <= 1.0:
        raise ConfigError(f"density={density}: the share of each delta kept, in (0, 1]")
    read = [read_adapter(d) for d in dirs]
    for d, (conf, _) in zip(dirs, read):
        if conf.get("peft_type") != "LORA" or conf.get("use_dora"):
            raise ConfigError(
                f"{d} is a {conf.get('peft_type')}{' (DoRA)' if conf.get('use_dora') else ''} adapter; "
                "PEFT combines only plain LoRA adapters"
            )
    conf0, meta0 = read[0]
    model = PeftModel.from_pretrained(load_base(dirs[0], conf0, meta0, base), str(dirs[0]), adapter_name="a0")
    names = ["a0"]
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
        names.append(f"a{i}")
    kwargs = {"density": density} if how in NEEDS_DENSITY else {}
    try:
        model.add_weighted_adapter(names, list(weights), "default", combination_type=how, **kwargs)
    except ValueError as e:
        hint = " (linear needs equal ranks: use cat or svd)" if how == "linear" else ""
        raise DistftError(f"cannot combine these adapters with {how}: {e}{hint}") from None
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    base_path = _base_path(dirs[0], conf0, base)
    model.peft_config["default"].base_model_name_or_path = base_path
    model.peft_config["default"].inference_mode = True
    _save(out, model, _tokenizer(dirs[0], base_path))
    info = {
        "combined_from": [str(d.resolve()) for d in dirs],
        "weights": list(weights),
        "combination": how,
        "density": density,
        "base": base_path,
        "adapter": True,
        "quantized_base": any(m.get("quantized_base") for _, m in read),
        **{k: meta0[k] for k in ("method", "tuning", "id2label") if k in meta0},
    }
    (out / "distft_export.json").write_text(json.dumps(info, indent=2))
    return out


def _save(out: Path, model, tokenizer) -> None:
    """Write to out.tmp, then rename: a failed save never leaves a half-written `out`."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
