"""Export to Hugging Face format: full safetensors weights, or a PEFT adapter that names a
loadable base (the generated tiny base is copied next to it), plus the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distft import dist


def export(strategy, cfg, tuning, method, model_path: str, tokenizer, run_dir: Path, info) -> Path:
    state = strategy.full_state_dict()  # collective: every rank takes part
    out = run_dir / "export"
    if info.is_main:
        tmp = run_dir / "export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        base_path = model_path
        if not cfg.model.name_or_path:  # generated tiny base: ship it with the export
            shutil.copytree(model_path, tmp / "base")
            base_path = str((out / "base").resolve())
        fresh = _fresh_model(base_path if tuning.adapter else model_path, cfg, method, tmp)
        if tuning.adapter:
            _save_adapter(fresh, state, cfg, tuning, base_path, tmp)
        else:
            fresh.load_state_dict(state, strict=True)
            fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (tmp / "merged").is_dir():
            tokenizer.save_pretrained(tmp / "merged")
        info_file = {"tuning": cfg.tuning.name, "method": cfg.method.name, "base": base_path}
        (tmp / "distft_export.json").write_text(json.dumps(info_file, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out


def _fresh_model(path: str, cfg, method, tmp: Path):
    from transformers import AutoModelForCausalLM

    auto = method.auto_class or AutoModelForCausalLM
    src = tmp / "base" if (tmp / "base").is_dir() else path
    return auto.from_pretrained(src, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)


def _save_adapter(base, state: dict, cfg, tuning, base_path: str, out: Path) -> None:
    """Load the trained adapter tensors into a fresh PEFT model on the unquantized base and save;
    refuses to write an adapter with tensors missing (the ZeRO-3 empty-adapter trap)."""
    from peft import get_peft_model

    model = get_peft_model(base, tuning.peft_config(cfg))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    adapter_sd = {k: v for k, v in state.items() if k in trainable}
    missing = trainable - set(adapter_sd)
    if missing:
        raise RuntimeError(f"adapter export is missing {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(adapter_sd, strict=False)
    model.peft_config["default"].base_model_name_or_path = base_path
    model.save_pretrained(out)
    if cfg.tuning.merge_on_export:
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
