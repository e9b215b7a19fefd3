"""Export to Hugging Face format: full safetensors weights, or a PEFT adapter that names a
loadable base, plus the tokenizer.

An adapter export survives a move: its `base_model_name_or_path` is the base's hub id when it came
from the hub, or the absolute path of a local base directory (which does not move with the run
dir). The generated tiny base moves with it: it is copied into export/base, and its config and
weights also to the export's root, so transformers loads the export from anywhere as a model with
an embedded adapter (`AutoModelForCausalLM.from_pretrained(export)`), and distft-export falls back
to export/base. (PEFT's AutoPeftModel would resolve a relative name against the current directory,
not the adapter's, so no relative name is written: see docs/guides/export.md.)

The export verifies itself: the trained (wrapped, possibly sharded) model's logits on a probe
batch are recorded, and the freshly loaded export must reproduce them before export/ appears.
Rank 0 alone loads and checks it; the other ranks wait on a key of the process group's store,
not in a collective, so a slow check cannot trip the collective timeout (cluster.timeout_s).
Fault injection: DISTFT_FAULT_EXPORT_SLEEP=<seconds> stalls rank 0 that long inside the export.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from distft.data import vision
from distft.dtypes import PRECISION_DTYPES
from distft.errors import DistftError
from distft.models import vlm
from distft.runtime.rank0 import on_rank0

# Largest |trained - exported| logit difference accepted, relative to the logits' scale.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}
BASE_DIR = "base"  # the generated tiny base inside an adapter export
SLEEP_ENV = "DISTFT_FAULT_EXPORT_SLEEP"


def export(trainer) -> Path:
    info, method = trainer.info, trainer.method
    probe_batch = method.collate(trainer.data.val[:2] or trainer.data.train[:2])
    trained_logits = probe_logits(trainer.strategy.model, trainer.strategy, method, probe_batch, info)
    state = trainer.strategy.full_state_dict()  # collective: every rank takes part
    out = trainer.run_dir / "export"
    on_rank0("export", lambda: _write(trainer, out, probe_batch, trained_logits, state), info.is_main)
    return out


def _write(trainer, out: Path, probe_batch: dict, trained_logits: torch.Tensor, state: dict) -> None:
    """Rank 0: build the export in export.tmp, check it, then rename it to export/."""
    cfg, tuning, method = trainer.cfg, trainer.tuning, trainer.method
    if os.environ.get(SLEEP_ENV):
        time.sleep(float(os.environ[SLEEP_ENV]))
    tmp = trainer.run_dir / "export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    embedded = tuning.adapter and not cfg.model.name_or_path  # generated tiny base: ship it along
    if embedded:
        shutil.copytree(trainer.model_path, tmp / BASE_DIR)
    base_name = str((out / BASE_DIR).resolve()) if embedded else base_reference(trainer.model_path)
    load_kwargs = tuning.load_kwargs(cfg, PRECISION_DTYPES[cfg.train.precision]) if tuning.adapter else {}
    fresh = _fresh_model(tmp / BASE_DIR if embedded else trainer.model_path, cfg, method, load_kwargs)
    if tuning.adapter:
        fresh = _load_adapter(fresh, state, cfg, tuning)
        fresh.peft_config["default"].base_model_name_or_path = base_name
        if method.auto_class is not None and embedded:
            # A head's shape (num_labels, label names) and pad id live in the base's config:
            # the copied base carries them, so the adapter loads with no extra arguments.
            fresh.get_base_model().config.save_pretrained(tmp / BASE_DIR)
    else:
        fresh.load_state_dict(state, strict=True)
    diff = _verify(fresh, method, probe_batch, trained_logits, cfg)
    fresh.save_pretrained(tmp)
    if embedded:
        embed_base(tmp, tmp / BASE_DIR)
    if tuning.adapter and cfg.tuning.merge_on_export:
        fresh.merge_and_unload().save_pretrained(tmp / "merged")
        trainer.tokenizer.save_pretrained(tmp / "merged")
    vlm.save_processor(trainer.tokenizer, tmp)  # a VLM's processor, else the tokenizer
    meta = {
        "tuning": cfg.tuning.name,
        "method": cfg.method.name,
        "base": base_name,
        "adapter": bool(tuning.adapter),
        "quantized_base": "quantization_config" in load_kwargs,
        "probe_max_abs_diff": diff,
        "probe_input_ids": probe_batch["input_ids"].tolist(),
        "probe_logits": trained_logits.tolist(),
        **method.export_meta(),  # e.g. label names
    }
    (tmp / "distft_export.json").write_text(json.dumps(meta))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def base_reference(model_path: str) -> str:
    """How an adapter names a base that stays outside the export: a local directory by its absolute
    path (a relative one would depend on the loader's working directory), a hub id as it is."""
    path = Path(model_path)
    return str(path.resolve()) if path.is_dir() else model_path


def embed_base(export_dir: Path, base_dir: Path) -> None:
    """Copy the base's config and weights to the adapter export's root: transformers then loads
    the directory as a model with an embedded adapter (base from the same directory, adapter
    applied), wherever the directory has been moved to."""
    for f in base_dir.iterdir():
        weights = f.name.startswith("model") and f.name.endswith((".safetensors", ".safetensors.index.json"))
        if weights or f.name in ("config.json", "generation_config.json"):
            shutil.copy2(f, export_dir / f.name)


@torch.no_grad()
def probe_logits(model, strategy, method, batch: dict, info) -> torch.Tensor:
    """A few logits of `model` on `batch` (every rank runs it: sharded weights need all ranks)."""
    was_training = model.training
    model.eval()
    batch = {k: v.to(info.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with strategy.accumulate(True):
        out = model(**vision.model_inputs(batch))
    model.train(was_training)
    return out.logits.float().flatten()[:512].cpu()


@torch.no_grad()
def _verify(fresh, method, batch: dict, trained: torch.Tensor, cfg) -> float:
    fresh.eval()
    # The fresh model's own device: a 4-bit base loads on the GPU while the probe batch is on the CPU.
    device = next(fresh.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    out = fresh(**vision.model_inputs(batch))
    got = out.logits.float().flatten()[:512].cpu()
    diff = float((got - trained).abs().max())
    scale = float(trained.abs().max()) or 1.0
    if diff > TOLERANCE[cfg.train.precision] * scale:
        raise DistftError(
            f"export check failed: the exported model's logits differ from the trained model's by "
            f"{diff:.3g} (scale {scale:.3g}); the export was not written"
        )
    return diff


def _fresh_model(src, cfg, method, load_kwargs: dict):
    from transformers import AutoModelForCausalLM

    auto = method.auto_class or (vlm.auto_class() if vlm.is_vlm(str(src)) else AutoModelForCausalLM)
    return auto.from_pretrained(
        src, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code, **load_kwargs
    )


def _load_adapter(base, state: dict, cfg, tuning):
    """A fresh PEFT model with the trained adapter tensors; refuses an adapter with tensors
    missing (the ZeRO-3 empty-adapter trap)."""
    model = tuning.apply(base, cfg)  # the same transform as in training
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    adapter_sd = {k: v for k, v in state.items() if k in trainable}
    missing = trainable - set(adapter_sd)
    if missing:
        raise DistftError(
            f"adapter export is missing {len(missing)} tensors (e.g. {sorted(missing)[0]}); "
            "nothing was written"
        )
    model.load_state_dict(adapter_sd, strict=False)
    return model
