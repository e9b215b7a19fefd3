"""Sharded loading: no rank holds the whole model in host RAM (ANCHORS #6).

For strategies that shard parameters from the start (a strategy module with `loads_sharded =
True`, i.e. FSDP2), every rank builds the model on the meta device, the strategy shards it, and
each rank then allocates and reads only its own rows of every weight from the safetensors files.
A file is opened per tensor, so its memory-mapped pages are released right after the copy. Used
for full fine-tuning of a Hugging Face safetensors checkpoint (a local directory, or a hub id
whose snapshot is in the local Hugging Face cache) on more than one rank; otherwise
(adapters, quantized loads, DDP/ZeRO, `.bin` checkpoints) every rank loads normally.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHECKPOINT_ATTR = "_distft_checkpoint"


def local_dir(model_path: str) -> Path | None:
    """The local directory of a checkpoint: the path itself, or a hub id's snapshot already in the
    local Hugging Face cache (HF_HUB_CACHE; nothing is downloaded), else None."""
    root = Path(model_path)
    if root.is_dir():
        return root
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_path, local_files_only=True))
    except (OSError, ValueError):  # not cached, or not a hub id
        return None


def _weight_files(model_path: str) -> dict[str, str] | None:
    """{tensor name: file} from model.safetensors(.index.json) in a local directory or a cached
    hub snapshot, else None."""
    root = local_dir(model_path)
    if root is None:
        return None
    if (root / "adapter_config.json").is_file():  # an adapter export with its base embedded: the
        return None  # base weights alone would drop the adapter; from_pretrained applies it
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(root / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = root / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: str(single) for k in f.keys()}
    return None


def _names(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def meta_model(model_path: str, cfg, auto_class=None):
    """The model with parameters on the meta device (buffers computed as usual), or None when
    its checkpoint cannot be read shard by shard."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = _weight_files(model_path)
    if files is None:
        return None
    model_path = str(local_dir(model_path))  # a hub id: its cached snapshot, read with no network
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    auto_class = auto_class or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(
            config,
            dtype=torch.float32,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    model.tie_weights()  # the meta patch re-creates parameters, untying the head from the embedding
    if not all(any(n in files for n in names) for names in _names(model).values()):
        return None  # renamed or missing keys: leave it to from_pretrained
    setattr(model, CHECKPOINT_ATTR, model_path)
    return model


def load_shards(model: torch.nn.Module, device: torch.device) -> None:
    """After the strategy sharded the meta model: allocate this rank's shards and read them."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = _weight_files(getattr(model, CHECKPOINT_ATTR))
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # to_empty wipes them
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        names = _names(model)
        for _, p in model.named_parameters():
            key = next(n for n in names[id(p)] if n in files)
            if isinstance(p, DTensor):
                local = p.to_local()
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            else:
                local, index = p, tuple(slice(0, s) for s in p.shape)
            if local.numel() == 0:
                continue
            with safe_open(files[key], framework="pt") as f:  # reopened: mapped pages go per tensor
                part = f.get_slice(key)[index] if index else f.get_tensor(key)
            local.copy_(part.to(local.dtype))
            del part
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"distft: sharded load: each rank read only its shards of {files[key]}", flush=True)
