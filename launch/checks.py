"""What distft-launch checks on this machine before any rank starts: the paths a rank would
otherwise fail on after torchrun started (its message buried under torchrun's failure report).

Local paths only: hub ids are resolved by the ranks (the launcher may have no network)."""

from __future__ import annotations

from pathlib import Path

from distft.data.sources import check_path
from distft.errors import ConfigError


def looks_local(spec: str) -> bool:
    """A path, not a hub id (`org/name` or a bare name): absolute, relative with ./ ../ ~, or
    more than one slash. An existing directory is local whatever its form."""
    return Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def check_model_path(spec: str, key: str = "model.name_or_path") -> None:
    p = Path(spec).expanduser()
    if not looks_local(spec):
        return
    if not p.is_dir():
        raise ConfigError(
            f"{key}={spec}: no such directory; give a local Hugging Face model directory "
            "(with config.json) or a hub id such as Qwen/Qwen2.5-0.5B"
        )
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise ConfigError(
            f"{key}={spec}: the directory has no config.json (nor adapter_config.json): is it a "
            "Hugging Face model directory? (an `export/` of a run is one)"
        )


def before_ranks(cfg) -> None:
    """Raise the first path error (DataError / ConfigError, one line each)."""
    for spec in [*cfg.data.path, *cfg.data.replay_path]:
        check_path(spec)
    if cfg.model.name_or_path:
        check_model_path(cfg.model.name_or_path)
