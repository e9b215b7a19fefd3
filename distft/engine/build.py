"""What `Trainer.build` assembles before the loop: the run dir and its config.yaml, the seed, the
model (loaded, transformed by the tuning, optionally compiled), the MFU meter, the progress bar."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distft.dtypes import PRECISION_DTYPES
from distft.engine import checkpoint, fingerprint, runlock
from distft.models import attention, base_dtype, kernels, vlm
from distft.models.sharded_load import host_stubs, load_for, meta_tuning
from distft.perf.mfu import MfuMeter, attention_span, scored_fraction
from distft.runtime import dist


def default_output_dir() -> str:
    return str(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))


def open_run(cfg, composed, info) -> tuple[Path, checkpoint.Checkpointer, Path | None, dict]:
    """The run dir agreed by all ranks (cfg.output_dir is set to it), locked for this job; which
    checkpoint to resume and whether this config may continue it, decided before anything is
    built or written; then rank 0 writes config.yaml (the one it replaces goes to the history)."""
    path = Path(dist.broadcast_object(cfg.output_dir or default_output_dir())).resolve()
    cfg.output_dir = str(path)
    if info.is_main:
        path.mkdir(parents=True, exist_ok=True)
    runlock.acquire(path, info)  # one job per run dir
    ckpt = checkpoint.Checkpointer(path, info, cfg.train.keep_last, cfg.train.async_save)
    resume_path = ckpt.resolve(cfg.resume, cfg.resume_unverified)
    run_fingerprint = fingerprint.accept(cfg, path, info, resume_path)
    if info.is_main:
        previous = fingerprint.previous_config(path)
        write_config(cfg, composed, path)
        fingerprint.archive_config(path, previous)
    dist.barrier()
    return path, ckpt, resume_path, run_fingerprint


def write_config(cfg, composed, run_dir: Path) -> None:
    if composed is not None:
        plain = OmegaConf.to_container(composed, resolve=True)
        plain.pop("hydra", None)
        plain["output_dir"] = cfg.output_dir
        OmegaConf.save(OmegaConf.create(plain), run_dir / "config.yaml")
    else:
        OmegaConf.save(OmegaConf.structured(dataclasses.asdict(cfg)), run_dir / "config.yaml")


def seed(value: int) -> None:
    random.seed(value)
    torch.manual_seed(value)


def model(cfg, info, method, tuning, model_path: str, strategy) -> torch.nn.Module:
    """The model to train, before the strategy wraps it: loaded sharded where the strategy shards
    parameters (distft.models.sharded_load.load_for), tuned, optionally compiled."""
    dtype = base_dtype(cfg, tuning.adapter)  # adapters: the frozen base in the compute precision
    extra = tuning.load_kwargs(cfg, dtype)
    image_text = vlm.is_vlm(model_path, cfg.model.trust_remote_code)  # AutoModelForImageTextToText, whole
    meta = meta_tuning(cfg) and not image_text
    out = load_for(strategy, model_path, cfg, info, dtype, extra, method.auto_class, meta)
    kernels.apply(out, cfg.model)  # model.kernels=liger (GPU; validated before any rank starts)
    attention.use_for(out, cfg, info.device)  # packed rows on CPU: attention per example, not masked
    if cfg.train.gradient_checkpointing:
        out.gradient_checkpointing_enable({"use_reentrant": False})
    out.config.use_cache = False
    with host_stubs(out):  # a meta-device base: PEFT's adapters are created real, as on a full load
        out = tuning.apply(out, cfg)
    if image_text and not tuning.adapter:
        vlm.freeze(out, cfg)  # model.freeze_vision / freeze_projector (adapters: distft.tuning.lora)
    if cfg.train.compile:
        compile_blocks(out)
    return out


def mfu_meter(cfg, info, model: torch.nn.Module, data, method=None) -> MfuMeter:
    """FLOPs per token from the unwrapped model (sharding hides shapes); the token-weighted example
    length as T (`attention_span`); the head counted on the scored tokens only for methods that
    project only those."""
    seq_len = attention_span(data.train, cfg.data.max_length)
    scored = scored_fraction(data.train) if method is not None and method.scored_head else None
    return MfuMeter.for_model(
        model, seq_len, info.device, PRECISION_DTYPES[cfg.train.precision], info.world_size, scored or 1.0
    )


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every repeated block (they share one compiled graph) before the strategy
    wraps them, as torchtitan does; models without blocks are compiled whole."""
    from distft.models.layers import decoder_layers

    blocks = decoder_layers(model)
    for block in blocks or [model]:
        block.compile()


def progress(total: int, start: int, enabled: bool):
    from distft.engine.progress import progress_bar  # plain lines when stderr is not a terminal

    return progress_bar(total, start) if enabled else None
