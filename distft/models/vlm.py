"""Vision-language models (LLaVA, Qwen2-VL, Idefics3, ...): detection, their processor, the parts
that can be frozen, and LoRA restricted to the language model.

A model is a VLM when its config has a `vision_config`; it is then loaded with
`AutoModelForImageTextToText` and its `AutoProcessor`. The processor travels with the tokenizer
(`tokenizer.processor`), so the data encoder, the collate and the export reach it without a new
argument anywhere. The vision tower and the projector are found by the attribute names the
families use (`vision_tower`, `visual`, `vision_model`; `multi_modal_projector`, `connector`,
`merger`), not by a table per model class.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from distft.errors import ConfigError

VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "vision_projection")
LANGUAGE_NAMES = ("language_model", "text_model")


def is_vlm(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """The checkpoint's config has a vision tower (a local directory is read directly)."""
    config = Path(name_or_path, "config.json")
    if config.is_file():
        return "vision_config" in json.loads(config.read_text())
    try:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False
    return getattr(conf, "vision_config", None) is not None


def auto_class():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def processor_tokenizer(name_or_path: str, cfg):
    """The processor's tokenizer, with the processor itself as `.processor`. Packing would join
    examples whose image tokens and pixel tensors must stay paired: refused here, before any data
    is prepared."""
    from transformers import AutoProcessor

    method = getattr(getattr(cfg, "method", None), "name", "sft")
    if method != "sft":
        raise ConfigError(
            f"method={method}: vision-language models ({name_or_path!r}) train with method=sft only"
        )
    if cfg.data.packing:
        raise ConfigError(
            f"data.packing=true is not supported for the vision-language model {name_or_path!r} (image "
            "tokens and pixels must stay in one example); set data.packing=false"
        )
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load the processor of the vision-language model {name_or_path!r}: {e}. The model "
            "directory needs its processor files (preprocessor/processor config and tokenizer)"
        ) from None
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.processor = processor
    return tok


def processor_of(tokenizer):
    """The processor a VLM's tokenizer carries, else None (a text-only model)."""
    return getattr(tokenizer, "processor", None)


def save_processor(tokenizer, out: Path) -> None:
    """A VLM's processor (image processor, tokenizer, chat template), else the tokenizer."""
    (processor_of(tokenizer) or tokenizer).save_pretrained(out)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_vlm_model(model: torch.nn.Module) -> bool:
    return getattr(getattr(_base(model), "config", None), "vision_config", None) is not None


def find_parts(model: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    """Qualified names of the outermost modules whose own name is one of `names`."""
    found: list[str] = []
    for name, _ in _base(model).named_modules():
        if name.rsplit(".", 1)[-1] in names and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def freeze(model: torch.nn.Module, cfg) -> dict[str, int]:
    """Full tuning: model.freeze_vision / model.freeze_projector switch requires_grad off on
    those parts (the projector may sit inside the vision tower, as Qwen2-VL's merger does, so it
    is decided last). Returns the number of frozen parameters per part."""
    if not is_vlm_model(model):
        return {}
    base, frozen = _base(model), {}
    modules = dict(base.named_modules())
    plan = [("vision", VISION_NAMES, cfg.model.freeze_vision), ("projector", PROJECTOR_NAMES, None)]
    for part, names, off in plan:
        off = cfg.model.freeze_projector if off is None else off
        for name in find_parts(base, names):
            params = list(modules[name].parameters())
            for p in params:
                p.requires_grad_(not off)
            if off:
                frozen[part] = frozen.get(part, 0) + sum(p.numel() for p in params)
    if frozen and os.environ.get("RANK", "0") == "0":
        parts = ", ".join(f"{part} {n:,}" for part, n in frozen.items())
        print(f"distft: vision-language model: frozen parameters: {parts}", flush=True)
    return frozen


def language_targets(model: torch.nn.Module, targets: list[str]) -> str:
    """A PEFT target regex that reaches only the language model's linear layers: `targets`
    (module names, or all-linear) inside the language model, never the vision tower or the
    projector, never the output head."""
    base = _base(model)
    lm = find_parts(base, LANGUAGE_NAMES)
    if not lm:
        raise ConfigError(
            f"{type(base).__name__}: no language model found (looked for {', '.join(LANGUAGE_NAMES)}); "
            "set tuning.target_modules to the full module names to adapt"
        )
    if targets == ["all-linear"]:
        names = {
            n.rsplit(".", 1)[-1]
            for prefix in lm
            for n, m in base.get_submodule(prefix).named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    else:
        names = set(targets)
    prefixes = "|".join(re.escape(p) for p in lm)
    leaves = "|".join(re.escape(n) for n in sorted(names))
    return rf"^(.*\.)?({prefixes})\..*\.({leaves})$"


def modules_to_save(model: torch.nn.Module, cfg) -> list[str]:
    """Adapter tunings: the parts left unfrozen (model.freeze_vision=false,
    model.freeze_projector=false) train in full beside the adapters (PEFT modules_to_save)."""
    out = []
    if not cfg.model.freeze_projector:
        out += find_parts(model, PROJECTOR_NAMES)
    if not cfg.model.freeze_vision:
        out += find_parts(model, VISION_NAMES)
    return out


def restrict_lora(peft_cfg, model: torch.nn.Module, cfg):
    """A LoRA config on a VLM: the language model only, unfrozen parts as modules_to_save."""
    if not is_vlm_model(model):
        return peft_cfg
    peft_cfg.target_modules = language_targets(model, list(cfg.tuning.target_modules))
    saved = modules_to_save(model, cfg)
    if saved:
        peft_cfg.modules_to_save = saved
    return peft_cfg
