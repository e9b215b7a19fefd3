"""Full fine-tuning: every parameter trains, except those `tuning.freeze` names.

`tuning.freeze` entries are name patterns matched against whole dot-separated parts of parameter
names (`*` is a wildcard, so `embed_tokens` freezes `model.embed_tokens.weight` and `layers.1`
never matches `layers.10`), with integer ranges `A-B` (inclusive) for layer indices:
`freeze=[embed_tokens,layers.0-1]` freezes the embeddings and the first two decoder layers;
`layers.*.self_attn` freezes every attention block. The trainable count is printed at start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from distft.errors import ConfigError
from distft.tuning import peft_common

_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass
class FullConfig:
    name: str = "full"
    """Tuning mode."""
    freeze: list[str] = field(default_factory=list)
    """Parameters to keep frozen: name patterns (`embed_tokens`, `layers.*.mlp`) and layer ranges
    (`layers.0-5`, inclusive). Empty: everything trains."""
    merge_on_export: bool = False
    """Unused for full tuning (the export is already full weights)."""


config = FullConfig
adapter = False


def validate(cfg) -> None:
    for pattern in cfg.tuning.freeze:
        for part in pattern.split("."):
            m = _RANGE.match(part)
            if m and int(m.group(1)) > int(m.group(2)):
                raise ConfigError(
                    f"tuning.freeze entry {pattern!r}: range {part} is empty; write ranges low-high, "
                    "e.g. layers.0-5"
                )


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def pattern_regex(pattern: str) -> re.Pattern:
    """A regex for one freeze entry that matches whole dot-separated parts of a parameter name."""
    parts = []
    for part in pattern.split("."):
        m = _RANGE.match(part)
        if m:
            parts.append("(?:" + "|".join(str(i) for i in range(int(m.group(1)), int(m.group(2)) + 1)) + ")")
        else:
            parts.append(".*".join(re.escape(s) for s in part.split("*")))
    return re.compile(r"(?:^|\.)" + r"\.".join(parts) + r"(?:\.|$)")


def frozen_names(names: list[str], patterns: list[str]) -> set[str]:
    """Parameter names matched by any pattern; a pattern that matches nothing is an error (a typo
    would otherwise silently train everything)."""
    out: set[str] = set()
    for pattern in patterns:
        rx = pattern_regex(pattern)
        hits = {n for n in names if rx.search(n)}
        if not hits:
            examples = ", ".join(names[:4] + (["..."] if len(names) > 4 else []))
            raise ConfigError(
                f"tuning.freeze entry {pattern!r} matches no parameter; names look like: {examples}"
            )
        out |= hits
    return out


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    patterns = list(cfg.tuning.freeze)
    if patterns:
        names = [n for n, _ in model.named_parameters()]
        frozen = frozen_names(names, patterns)
        if len(frozen) == len(names):
            raise ConfigError(f"tuning.freeze={patterns} freezes every parameter; nothing would train")
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
    peft_common.report(model, cfg, f"frozen: {', '.join(patterns)}" if patterns else "")
    return model
