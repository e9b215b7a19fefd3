"""Where the shipped config groups and SLURM templates live, from a checkout or an installed wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _find(name: str, package: str) -> Path:
    local = _REPO / name
    if local.is_dir() and (_REPO / "pyproject.toml").is_file():
        return local
    # Installed wheel: pyproject maps conf/ and slurm/ to these packages.
    return Path(str(resources.files(package)))


def conf_dir() -> Path:
    return _find("conf", "distft_conf")


def slurm_dir() -> Path:
    return _find("slurm", "distft_slurm")
