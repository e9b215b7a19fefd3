"""What every PEFT tuning mode shares: the PEFT task type from the model's head, starting from a
saved adapter (continual learning), and the trainable-parameter report printed at start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distft.errors import ConfigError


def task_type(model: torch.nn.Module) -> str:
    """PEFT task type of a transformers model: a sequence-classification head needs SEQ_CLS, so that
    PEFT trains (and saves) the new head as `modules_to_save`; anything else is a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "SEQ_CLS" if type(base).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def check_init_adapter(path: str | None, key: str = "tuning.init_adapter") -> None:
    if path and not (Path(path) / "adapter_config.json").is_file():
        raise ConfigError(
            f"{key}={path!r} is not a PEFT adapter directory (no adapter_config.json); give an "
            "export/ directory of an adapter run or a directory written by distft-adapter"
        )


def saved_peft_type(path: str) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text()).get("peft_type", "?")


def wrap(model: torch.nn.Module, cfg, peft_cfg) -> torch.nn.Module:
    """A PEFT model around `model`: a fresh adapter from `peft_cfg`, or, with tuning.init_adapter,
    the saved adapter's weights (and its own config: rank, targets) to continue training."""
    from peft import PeftModel, get_peft_model

    init = getattr(cfg.tuning, "init_adapter", None)
    if not init:
        return fp32_trainable(get_peft_model(model, model_targets(peft_cfg, model, cfg)))
    check_init_adapter(init)
    saved = saved_peft_type(init)
    if saved != str(getattr(peft_cfg.peft_type, "value", peft_cfg.peft_type)):
        raise ConfigError(
            f"tuning.init_adapter={init!r} holds a {saved} adapter but tuning={cfg.tuning.name} trains "
            f"{peft_cfg.peft_type}; pick the matching tuning option"
        )
    return fp32_trainable(PeftModel.from_pretrained(model, init, is_trainable=True))


def model_targets(peft_cfg, model: torch.nn.Module, cfg):
    """LoRA-family targets fitted to the model's kind: a vision-language model's language model
    only (distft/models/vlm.py); a mixture of experts' fused experts, its router frozen unless
    tuning.train_router (distft/tuning/moe.py). Other models and PEFT methods: unchanged."""
    from distft.models import vlm
    from distft.tuning import moe

    if not hasattr(peft_cfg, "target_parameters"):  # not a LoRA-family config
        return peft_cfg
    if vlm.is_vlm_model(model):
        return vlm.restrict_lora(peft_cfg, model, cfg)
    return moe.restrict_lora(peft_cfg, model, bool(getattr(cfg.tuning, "train_router", False)))


def fp32_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Trainable weights in fp32 over a base loaded in the compute precision: PEFT upcasts the
    adapter layers but not a copied head (modules_to_save), and FSDP2 needs one trainable dtype."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the values they hold."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    sizes = [(int(getattr(p, "ds_numel", p.numel())), p.requires_grad) for p in model.parameters()]  # ZeRO-3
    return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)


def report(model: torch.nn.Module, cfg, extra: str = "") -> tuple[int, int]:
    """Print the trainable-parameter count once (rank 0) so every run states what it trains."""
    trainable, total = count_parameters(model)
    if os.environ.get("RANK", "0") == "0":
        pct = 100.0 * trainable / max(total, 1)
        note = f" ({extra})" if extra else ""
        print(
            f"distft: tuning={cfg.tuning.name}: trainable parameters {trainable:,} of {total:,} "
            f"({pct:.3f}%){note}",
            flush=True,
        )
    return trainable, total
