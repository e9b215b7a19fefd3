"""Checks of values whose shape is not a number: strings that reach a shell or a batch script,
the run directory, and key combinations a library would get silently wrong.

Called by `distft.config.load.validate` before any process group (and before `distft-launch`
renders or submits anything).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from distft.errors import ConfigError

# A newline in a value rendered into `#SBATCH --job-name=...` starts a new script line: the job
# would run whatever follows it. CR and NUL break the same lines in other ways.
_CONTROL = re.compile(r"[\n\r\x00]")

# SLURM's own formats (sbatch(1)): what the renderer may put after `#SBATCH --key=`.
_NAME = r"[A-Za-z0-9_.+-]+"
SLURM_FORMATS: dict[str, tuple[re.Pattern, str]] = {
    "partition": (re.compile(rf"{_NAME}(,{_NAME})*"), "a partition name or a comma-separated list, e.g. gpu"),
    "qos": (re.compile(rf"{_NAME}(,{_NAME})*"), "a QOS name, e.g. normal"),
    "account": (re.compile(_NAME), "an account name (letters, digits, . _ + -)"),
    "job_name": (re.compile(_NAME), "letters, digits and . _ + - (no spaces), e.g. sft-llama"),
    "time": (
        re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE|unlimited|infinite"),
        "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 04:00:00 or 2-00:00:00",
    ),
    "mem": (
        re.compile(r"\d+[KMGTkmgt]?|auto"),
        "auto, or a size with an optional K/M/G/T unit, e.g. 64G (0: all)",
    ),
    "constraint": (re.compile(r"[^\s]+"), "node features without spaces, e.g. a100&ib"),
}
# One sbatch option per entry: `--exclusive`, `--mail-type=END` (the leading -- may be left out).
_SBATCH_OPTION = re.compile(r"(--)?[A-Za-z][A-Za-z0-9-]*(=[^\s]+)?")


def _strings(value: Any, where: str):
    """(key, string) for every string inside a value (lists and dicts included)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}")


def no_control_chars(value: Any, where: str) -> None:
    for key, text in _strings(value, where):
        if _CONTROL.search(text):
            raise ConfigError(
                f"{key}={text!r} contains a newline, carriage return or NUL; these would break out of "
                "the generated batch script or command line: remove them"
            )


def check_cluster(c) -> None:
    """Every cluster.* string free of line breaks; SLURM fields in SLURM's formats."""
    import dataclasses

    for f in dataclasses.fields(c):
        no_control_chars(getattr(c, f.name), f"cluster.{f.name}")
    for key, (pattern, shape) in SLURM_FORMATS.items():
        value = getattr(c, key, None)
        if value not in (None, "") and not pattern.fullmatch(str(value)):
            raise ConfigError(f"cluster.{key}={value!r} is not a SLURM {key}: give {shape}")
    for i, opt in enumerate(getattr(c, "sbatch_extra", [])):
        if not _SBATCH_OPTION.fullmatch(opt):
            raise ConfigError(
                f"cluster.sbatch_extra[{i}]={opt!r}: each entry must be one sbatch option, --option or "
                "--option=value without spaces, e.g. ['--exclusive', '--mail-type=END']"
            )
    if c.node_rank >= c.nodes:
        raise ConfigError(
            f"cluster.node_rank={c.node_rank} with cluster.nodes={c.nodes}: node ranks are 0..{c.nodes - 1}"
        )


def check_output_dir(output_dir: str | None) -> None:
    """A run dir that can be created and written: not a file, not on a read-only filesystem."""
    if output_dir is None:
        return
    no_control_chars(output_dir, "output_dir")
    path = Path(output_dir).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest part that exists
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise ConfigError(f"output_dir={output_dir!r} {what}; give a directory path (new or existing)")
    read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    if read_only or not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" ({probe} is where it would be created)"
        raise ConfigError(
            f"output_dir={output_dir!r} is not writable{where}"
            f"{': a read-only filesystem' if read_only else ''}; choose a directory you can write"
        )


def check_packing(cfg) -> None:
    """transformers' flash-attention path splits a packed row by its position ids only when a batch
    holds one row; with more rows examples would attend across their boundaries."""
    micro = cfg.train.micro_batch_size
    if cfg.data.packing and cfg.model.attn_implementation.startswith("flash_attention") and micro != 1:
        raise ConfigError(
            f"data.packing=true with model.attn_implementation={cfg.model.attn_implementation} needs "
            f"train.micro_batch_size=1 (got {micro!r}): with more rows per batch packed examples attend "
            "across their boundaries; raise train.grad_accum (or data.max_length) instead"
        )
