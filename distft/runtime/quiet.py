"""Known third-party noise, filtered once, here: what the libraries say about themselves
(deprecations inside their own code, optional kernels, their loading bars), not about the run.

Each rank calls `install()` first thing. DISTFT_VERBOSE=1 leaves everything as the libraries print
it. A warning raised by distft, or by a library about the user's data, model or config (anything
not matched below), still shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "DISTFT_VERBOSE"
# Libraries whose deprecation notices concern their own internals (the user cannot act on them).
LIBRARIES = r"(torch|transformers|peft|accelerate|trl|deepspeed|datasets|bitsandbytes|huggingface_hub|hydra)"
# (category, message regex) of warnings.warn calls known to be noise wherever they are attributed.
WARNINGS = [
    # A single process saving with torch.distributed.checkpoint: that is what distft means.
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized"),
]
# logger name -> message regexes of records known to be noise.
LOG_RECORDS = {
    # bitsandbytes looks for an optional CPU kernel package at import, on every rank.
    "bitsandbytes.backends.cpu.ops": [r"Failed to load CPU gemm_4bit_forward from kernels-community"],
    # DeepSpeed (imported by transformers wherever it is installed, so in DDP and FSDP jobs too)
    # finds no GPU on a CPU machine; the run's preflight report names the device.
    "DeepSpeed": [r"Setting accelerator to CPU\. If you have GPU"],
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _Drop(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> bool:
    """Filter the known noise (before the libraries are imported: some speak at import time).
    Returns False and changes nothing when DISTFT_VERBOSE is set."""
    if verbose():
        return False
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES + r"(\.|$)")
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, patterns in LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(patterns))
    if not sys.stderr.isatty():
        # The per-load "Loading weights" / "Writing model shards" bars of transformers and the hub:
        # carriage returns in a log file (on a terminal they stay: a download's progress is useful).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return True
