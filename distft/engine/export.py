"""Export to Hugging Face format: full safetensors weights, or a PEFT adapter that names a
loadable base (a generated tiny base is copied next to it), plus the tokenizer.

The export verifies itself: the trained (wrapped, possibly sharded) model's logits on a probe
batch are recorded, and the freshly loaded export must reproduce them before export/ appears.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distft.errors import DistftError
from distft.runtime import dist

# Largest |trained - exported| logit difference accepted, relative to the logits' scale.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


def export(trainer) -> Path:
    cfg, info, tuning, method = trainer.cfg, trainer.info, trainer.tuning, trainer.method
    probe_batch = method.collate(trainer.data.val[:2] or trainer.data.train[:2])
    trained_logits = probe_logits(trainer.strategy.model, trainer.strategy, method, probe_batch, info)
    state = trainer.strategy.full_state_dict()  # collective: every rank takes part
    out = trainer.run_dir / "export"
    if info.is_main:
        tmp = trainer.run_dir / "export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        base_path = trainer.model_path
        if tuning.adapter and not cfg.model.name_or_path:  # generated tiny base: ship it along
            shutil.copytree(trainer.model_path, tmp / "base")
            base_path = str((out / "base").resolve())
        load_kwargs = tuning.load_kwargs(cfg, _compute_dtype(cfg)) if tuning.adapter else {}
        src = tmp / "base" if (tmp / "base").is_dir() else trainer.model_path
        fresh = _fresh_model(src, cfg, method, load_kwargs)
        if tuning.adapter:
            fresh = _load_adapter(fresh, state, cfg, tuning)
            fresh.peft_config["default"].base_model_name_or_path = base_path
            if method.auto_class is not None and (tmp / "base").is_dir():
                # A head's shape (num_labels, label names) and pad id live in the base's config:
                # the copied base carries them, so the adapter loads with no extra arguments.
                fresh.get_base_model().config.save_pretrained(tmp / "base")
        else:
            fresh.load_state_dict(state, strict=True)
        diff = _verify(fresh, method, probe_batch, trained_logits, cfg)
        fresh.save_pretrained(tmp)
        if tuning.adapter and cfg.tuning.merge_on_export:
            fresh.merge_and_unload().save_pretrained(tmp / "merged")
            trainer.tokenizer.save_pretrained(tmp / "merged")
        trainer.tokenizer.save_pretrained(tmp)
        meta = {
            "tuning": cfg.tuning.name,
            "method": cfg.method.name,
            "base": base_path,
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
    dist.barrier()
    return out


@torch.no_grad()
def probe_logits(model, strategy, method, batch: dict, info) -> torch.Tensor:
    """A few logits of `model` on `batch` (every rank runs it: sharded weights need all ranks)."""
    was_training = model.training
    model.eval()
    batch = {k: v.to(info.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with strategy.accumulate(True):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    model.train(was_training)
    return out.logits.float().flatten()[:512].cpu()


@torch.no_grad()
def _verify(fresh, method, batch: dict, trained: torch.Tensor, cfg) -> float:
    fresh.eval()
    out = fresh(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    got = out.logits.float().flatten()[:512].cpu()
    diff = float((got - trained).abs().max())
    scale = float(trained.abs().max()) or 1.0
    if diff > TOLERANCE[cfg.train.precision] * scale:
        raise DistftError(
            f"export check failed: the exported model's logits differ from the trained model's by "
            f"{diff:.3g} (scale {scale:.3g}); the export was not written"
        )
    return diff


def _compute_dtype(cfg) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]


def _fresh_model(src, cfg, method, load_kwargs: dict):
    from transformers import AutoModelForCausalLM

    auto = method.auto_class or AutoModelForCausalLM
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
