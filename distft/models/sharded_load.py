"""Sharded loading: no rank holds the whole model in host RAM (ANCHORS #6).

For strategies that shard parameters from the start (a strategy module with `loads_sharded =
True`: FSDP2's fsdp and hsdp), every rank builds the model on the meta device, the tuning wraps it
(PEFT adapters are created real, see `host_stubs`), the strategy shards it, and each rank then
allocates and reads only its own rows of every weight from the safetensors files. A file is opened
per tensor, so its memory-mapped pages are released right after the copy. Used for full and
adapter tunings and frozen models (reference, teacher, reward) from a Hugging Face safetensors
checkpoint (a local directory, or a hub id whose snapshot is in the local Hugging Face cache);
otherwise (pre-quantized checkpoints, `.bin` checkpoints, renamed keys) every rank loads normally.
ZeRO-3 partitions at construction instead (distft.strategies.deepspeed_zero.partitioned_load),
except for QLoRA, which transformers never builds under zero.Init: its meta model is read one
weight at a time, quantized, and partitioned right away (`load_partitioned`).
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


def meta_model(model_path: str, cfg, auto_class=None, dtype: torch.dtype = torch.float32, quantization=None):
    """The model with parameters on the meta device in `dtype` (buffers computed as usual), or None
    when its checkpoint cannot be read shard by shard. With a bitsandbytes 4-bit `quantization`
    (QLoRA), its linear layers are transformers' Linear4bit with packed meta weights
    (`quantize_meta`), which `load_shards` quantizes rank by rank."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = _weight_files(model_path)
    if files is None:
        return None
    model_path = str(local_dir(model_path))  # a hub id: its cached snapshot, read with no network
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        return None  # a pre-quantized checkpoint: from_pretrained deserializes it
    auto_class = auto_class or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(
            config,
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    model.tie_weights()  # the meta patch re-creates parameters, untying the head from the embedding
    if quantization is not None:
        quantize_meta(model, quantization)
    if not all(any(n in files for n in names) for names in _names(model).values()):
        return None  # renamed or missing keys: leave it to from_pretrained
    setattr(model, CHECKPOINT_ATTR, model_path)
    return model


def _packed_rows(numel: int, storage: torch.dtype) -> int:
    """Rows of bitsandbytes' packed 4-bit weight (shape (rows, 1), two values a byte, stored in
    `storage`), as bitsandbytes.functional.quantize_4bit allocates it."""
    return (numel + 1) // (2 * torch.empty((), dtype=storage).element_size())


def quantize_meta(model: torch.nn.Module, quantization) -> None:
    """The meta model as transformers quantizes it on load (the same quantizer picks the layers,
    skipping the head; the same model attributes PEFT and the export read), with each Linear4bit's
    weight a meta Params4bit of the packed shape: the strategy shards the packed rows, and
    `load_shards` quantizes each weight and keeps only this rank's rows (never a full-precision
    model, nor the whole 4-bit one, on any rank)."""
    from bitsandbytes.nn import Linear4bit, Params4bit
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    storage = quantization.bnb_4bit_quant_storage
    for m in model.modules():
        if isinstance(m, Linear4bit):
            w = m.weight
            rows = _packed_rows(w.numel(), storage)
            m.weight = Params4bit(
                torch.empty((rows, 1), dtype=storage, device="meta"),
                requires_grad=False,
                **{k: v for k, v in w.__dict__.items() if k in _PARAMS4BIT},
            )
            m.weight.module, m.weight.quant_storage, m.weight.bnb_quantized = m, storage, True
            m.quant_storage = storage
            # How to quantize the checkpoint's weight (the strategy replaces the Params4bit).
            m._distft_quant = {k: getattr(w, k) for k in _PARAMS4BIT} | {"quant_storage": storage}


_PARAMS4BIT = ("blocksize", "compress_statistics", "quant_type")


def _like(p: torch.nn.Parameter, data: torch.Tensor) -> torch.nn.Parameter:
    """A parameter of `data` of p's class: a bitsandbytes Params4bit keeps its quantization
    attributes (PEFT reads them to build its 4-bit LoRA layer)."""
    if type(p) is torch.nn.Parameter or not hasattr(p, "quant_storage"):
        return torch.nn.Parameter(data, requires_grad=p.requires_grad)
    keep = (*_PARAMS4BIT, "quant_state", "quant_storage", "module")
    attrs = {k: v for k, v in p.__dict__.items() if k in keep}
    return type(p)(data, requires_grad=p.requires_grad, bnb_quantized=True, **attrs)


# Tunings that can be applied to a meta-device model: their transform never reads the base
# weights' values, or reads them only for DoRA's magnitudes, which `load_shards` computes again from
# the weights it read (`dora_magnitudes`). A saved adapter (tuning.init_adapter) is loaded on the
# host stand-ins and its values kept.
META_TUNINGS = ("full", "lora", "ia3", "qlora", "dora")


def meta_tuning(cfg) -> bool:
    return cfg.tuning.name in META_TUNINGS


def load_for(
    strategy, model_path: str, cfg, info, dtype: torch.dtype, extra: dict, auto_class=None, meta: bool = True
):
    """The model as `strategy` places it: on the meta device where the strategy reads each rank's
    shards itself (FSDP2, and ZeRO-3 for 4-bit QLoRA; safetensors checkpoints, `meta` allowed),
    else loaded inside the strategy's load context (ZeRO-3 partitions every weight as it is built;
    a no-op elsewhere)."""
    from distft.models.loader import load_model

    # A method's own model class (the reward method's ScoreModel) has no from_config: load it whole.
    buildable = auto_class is None or hasattr(auto_class, "from_config")
    quantization = extra.get("quantization_config")
    plain = not extra or (set(extra) == {"quantization_config"} and _bnb_4bit(quantization))
    # ZeRO-3 partitions other models as transformers builds them (zero.Init), but transformers
    # skips zero.Init for quantized ones: those come on meta too (`load_partitioned`).
    quantized_meta = _bnb_4bit(quantization) and getattr(strategy, "loads_quantized_sharded", False)
    sharded = strategy.loads_sharded or quantized_meta
    if meta and buildable and sharded and info.world_size > 1 and plain:
        model = meta_model(model_path, cfg, auto_class, dtype, quantization)
        if model is not None:
            return model
    with strategy.load_context():
        return load_model(model_path, cfg, dtype, extra, auto_class)


def _bnb_4bit(quantization) -> bool:
    return bool(getattr(quantization, "load_in_4bit", False))


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
                done[id(p)] = p if new is None else _like(p, new)
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


def _quantized_rows(layer, weight: torch.Tensor, index: tuple, device: torch.device) -> torch.Tensor:
    """This rank's rows of a Linear4bit's packed 4-bit weight: the whole weight quantized as
    transformers quantizes it on load (one tensor at a time, then dropped), its quantization state
    kept on the layer (bitsandbytes gives it back to the gathered weight in forward)."""
    import bitsandbytes.functional as bnbf
    from transformers.pytorch_utils import Conv1D

    if issubclass(getattr(layer, "source_cls", torch.nn.Linear), Conv1D):
        weight = weight.T  # GPT-2's Conv1D stores the transpose, as transformers' Bnb4bitQuantize
    how = layer._distft_quant
    weight = weight.to(device=device, dtype=how["quant_storage"]).contiguous()
    packed, state = bnbf.quantize_4bit(weight, **how)
    layer.quant_state = state
    return packed[index].clone()


DORA_ATTR = "_distft_dora_init"  # fresh DoRA adapters on a meta base: magnitudes still to compute


def _whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def dora_magnitudes(model: torch.nn.Module) -> None:
    """DoRA's magnitude vectors as PEFT initializes them (the norm of each output row of the base
    weight plus the scaled LoRA product, DoraLinearLayer.get_weight_norm), from the shards just
    read: each layer's weight is gathered whole once (one layer at a time, in the same order on
    every rank) and each rank keeps its own rows of the norms. On the host stand-ins PEFT saw zeros."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for m in model.modules():
        for name, dora in getattr(m, "lora_magnitude_vector", {}).items():
            weight = _whole(m.get_base_layer().weight)
            lora_a, lora_b = _whole(m.lora_A[name].weight), _whole(m.lora_B[name].weight)
            norm = dora.get_weight_norm(weight=weight, lora_weight=lora_b @ lora_a, scaling=m.scaling[name])
            p = dora.weight
            if hasattr(p, "to_local"):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                norm = norm[offset[0] : offset[0] + shape[0]]
            _local(p).copy_(norm.to(p.dtype))


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
        quantized = {id(m.weight): m for m in model.modules() if hasattr(m, "_distft_quant")}
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
            layer = quantized.get(id(p))
            with safe_open(files[key], framework="pt") as f:  # reopened: mapped pages go per tensor
                if layer is not None:
                    part = _quantized_rows(layer, f.get_tensor(key), index, device)
                else:
                    part = f.get_slice(key)[index] if index else f.get_tensor(key)
            local.copy_(part.to(local.dtype))
            del part
        if getattr(model, DORA_ATTR, False):
            dora_magnitudes(model)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"distft: sharded load: each rank read only its shards of {files[key]}", flush=True)


def _read_whole(p: torch.nn.Parameter, names: list[str], files: dict, layer, device) -> torch.nn.Parameter:
    """A meta parameter's whole value from the checkpoint: quantized on `device` where it is a
    Linear4bit's weight (`layer`), with the layer's quantization state (kept on `device`, where
    bitsandbytes reads it beside the gathered weight)."""
    from safetensors import safe_open

    key = _checkpoint_key(names, files)
    if key is None:
        raise RuntimeError(f"sharded load: {names[0]} is neither in the checkpoint nor initialized")
    with safe_open(files[key], framework="pt") as f:  # reopened: mapped pages go per tensor
        value = f.get_tensor(key)
    if layer is not None:
        value = _quantized_rows(layer, value, (slice(None),), device)
    out = _like(p, value.to(p.dtype))
    if layer is not None:
        out.quant_state = layer.quant_state
    return out


def load_partitioned(model: torch.nn.Module, ds_config: dict, device: torch.device) -> None:
    """ZeRO-3's `load_shards` for a meta-device model (QLoRA: transformers builds quantized models
    outside zero.Init, so every rank would hold the whole base). One module's weights at a time:
    every rank reads them, quantizes a Linear4bit's (the same quantization state on every rank, as
    on a whole load), and DeepSpeed partitions them at once (as if built under zero.Init), so a
    rank holds its partitions plus one module's weights in transit. Real parameters (adapters
    made by the tuning) are left for deepspeed.initialize to partition."""
    import deepspeed

    deepspeed.init_distributed()  # zero.Init checks the batch sizes against DeepSpeed's world size
    files = _weight_files(getattr(model, CHECKPOINT_ATTR))
    names = _names(model)
    quantized = {id(m.weight): m for m in model.modules() if hasattr(m, "_distft_quant")}
    alive = list(model.parameters())  # keeps the ids in `names` and `done` from being reused
    done: dict[int, torch.nn.Parameter] = {}  # tied weights: one object
    first = None  # the first partitioned weight partitions the others with the same settings
    with torch.no_grad():
        for module in model.modules():
            fresh = []
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done and p.is_meta:
                    done[id(p)] = _read_whole(p, names[id(p)], files, quantized.get(id(p)), device)
                    fresh.append(done[id(p)])
                module._parameters[name] = done.setdefault(id(p), p)
            if fresh and first is None:
                holder = torch.nn.Module()
                for i, q in enumerate(fresh):
                    holder.register_parameter(f"p{i}", q)
                deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config)
                first = fresh[0]
            elif fresh:  # without parsing the config again
                first.convert_to_zero_parameters(param_list=fresh)
    del alive
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        source = getattr(model, CHECKPOINT_ATTR)
        print(f"distft: sharded load (ZeRO-3): each rank kept only its partitions of {source}", flush=True)
