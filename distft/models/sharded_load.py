"""Sharded loading: no rank holds the whole model in host RAM (ANCHORS #6).

For strategies that shard parameters from the start (a strategy module with `loads_sharded =
True`: FSDP2's fsdp and hsdp), every rank builds the model on the meta device, the tuning wraps it
(PEFT adapters are created real, see `host_stubs`), the strategy shards it, and each rank then
allocates and reads only its own rows of every weight from the safetensors files. A file is opened
per tensor, so its memory-mapped pages are released right after the copy. Used for full and
adapter tunings and frozen models (reference, teacher, reward) from a Hugging Face safetensors
checkpoint (a local directory, or a hub id whose snapshot is in the local Hugging Face cache);
otherwise (quantized loads, `.bin` checkpoints, renamed keys) every rank loads normally. ZeRO-3
partitions at construction instead (distft.strategies.deepspeed_zero.partitioned_load).
"""

from __future__ import annotations

import contextlib
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


def meta_model(model_path: str, cfg, auto_class=None, dtype: torch.dtype = torch.float32):
    """The model with parameters on the meta device in `dtype` (buffers computed as usual), or None
    when its checkpoint cannot be read shard by shard."""
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
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    model.tie_weights()  # the meta patch re-creates parameters, untying the head from the embedding
    if not all(any(n in files for n in names) for names in _names(model).values()):
        return None  # renamed or missing keys: leave it to from_pretrained
    setattr(model, CHECKPOINT_ATTR, model_path)
    return model


# Tunings whose transform never reads the base weights' values (DoRA's magnitudes and a saved
# adapter's load do): they can be applied to a meta-device model.
META_TUNINGS = ("full", "lora", "ia3")


def meta_tuning(cfg) -> bool:
    return cfg.tuning.name in META_TUNINGS and not getattr(cfg.tuning, "init_adapter", None)


def load_for(
    strategy, model_path: str, cfg, info, dtype: torch.dtype, extra: dict, auto_class=None, meta: bool = True
):
    """The model as `strategy` places it: on the meta device where the strategy reads each rank's
    shards itself (FSDP2, safetensors checkpoints, no quantization, `meta` allowed), else loaded
    inside the strategy's load context (ZeRO-3 partitions every weight as it is built; a no-op
    elsewhere)."""
    from distft.models.loader import load_model

    # A method's own model class (the reward method's ScoreModel) has no from_config: load it whole.
    buildable = auto_class is None or hasattr(auto_class, "from_config")
    if meta and buildable and strategy.loads_sharded and info.world_size > 1 and not extra:
        model = meta_model(model_path, cfg, auto_class, dtype)
        if model is not None:
            return model
    with strategy.load_context():
        return load_model(model_path, cfg, dtype, extra, auto_class)


def is_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _swap_params(model: torch.nn.Module, swap) -> None:
    """Replace every parameter `swap` maps (it returns None to keep one), tied ones by one object."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                new = swap(p)
                done[id(p)] = p if new is None else torch.nn.Parameter(new, requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]


@contextlib.contextmanager
def host_stubs(model: torch.nn.Module):
    """A meta-device model's weights as zero-stride host tensors (no memory) while the tuning
    transforms it: PEFT creates each adapter on its base weight's device, and on `meta` its freshly
    initialized values would be lost. Adapters are then real and initialized exactly as on a
    normally loaded model (same RNG draws); the base weights go back to `meta` after, for the
    strategy to shard and `load_shards` to read. A no-op for a model that is not on meta."""
    if not is_meta(model):
        yield
        return
    real = {id(p) for p in model.parameters() if not p.is_meta}
    _swap_params(model, lambda p: torch.zeros((), dtype=p.dtype).expand(p.shape) if p.is_meta else None)
    stubs = {id(p) for p in model.parameters() if id(p) not in real}
    try:
        yield
    finally:
        _swap_params(model, lambda p: torch.empty_like(p, device="meta") if id(p) in stubs else None)


def _checkpoint_key(names: list[str], files: dict) -> str | None:
    """The checkpoint's name of a parameter, also under a PEFT wrapper (`base_model.model.` prefix,
    `.base_layer.` inside adapted layers)."""
    for name in names:
        for cand in (name, name.removeprefix("base_model.model.")):
            cand = cand.replace(".base_layer.", ".")
            if cand in files:
                return cand
    return None


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def load_shards(model: torch.nn.Module, device: torch.device) -> None:
    """After the strategy sharded the meta model: allocate this rank's shards and read them. Real
    parameters (adapters made by the tuning) keep their values."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = _weight_files(getattr(model, CHECKPOINT_ATTR))  # a PEFT wrapper forwards to its base
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # to_empty wipes them
    kept = {n: _local(p).detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        names = _names(model)
        for name, p in model.named_parameters():
            if name in kept:
                _local(p).copy_(kept[name])
                continue
            key = _checkpoint_key(names[id(p)], files)
            if key is None:
                raise RuntimeError(f"sharded load: {name} is neither in the checkpoint nor initialized")
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
