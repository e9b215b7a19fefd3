"""Greedy generation on held-out prompts, sharded over ranks, scored by exact match; and the
context every generate call runs in (`generation_mode`)."""

from __future__ import annotations

import contextlib
import weakref

import torch

from distft.data.sft_format import prompt_text, reference_answer
from distft.runtime import dist

_ZERO3_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_zero3(module: torch.nn.Module, engine) -> None:
    """The DeepSpeed engine of a ZeRO-3 module, whose hooks generation takes off while it runs."""
    _ZERO3_ENGINES[module] = engine


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def _fsdp_gathered(modules: list):
    """FSDP2: every layer gathered once (in the same order on every rank) and kept for all the
    tokens of the call, instead of an all-gather per layer per token; resharded after."""
    # set_reshard_after_forward has no getter: keep each module's own setting (the root's is
    # chosen by FSDP2 at lazy init) to put back as it was.
    # The root's lazy init first, as its first forward would do: generate() may run a submodule
    # outside the root's forward (a VLM's vision tower), which would make that submodule a root.
    modules[0]._get_fsdp_state()._lazy_init()
    saved = []
    for m in modules:
        state = m._get_fsdp_state()
        groups = [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]
        saved.append((state, state._auto_reshard_after_forward, groups))
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for g, info in groups:
                g.post_forward_mesh_info = info


def _zero3_fits(engine) -> bool:
    """Whether the whole model, gathered, fits in half of the device's free memory (host RAM on
    CPU); else generation keeps ZeRO-3's per-layer gathers."""
    full = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in engine.module.parameters())
    device = next(engine.module.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return full <= free // 2


@contextlib.contextmanager
def _zero3_gathered(engine):
    """ZeRO-3: all weights gathered once for the call and its forward hooks taken off (what TRL's
    unwrap_model_for_generation does), instead of a gather per layer per token. Weights a previous
    forward left gathered are released first, so that every call gathers the same set once."""
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:
        offload.partition_all_parameters()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module, dtype: torch.dtype | None = None, gather: bool = True):
    """The context of a generate call: sharded weights (FSDP2, ZeRO-3) gathered once for the whole
    call when `gather`, and autocast to the compute `dtype` where weights are still fp32 (DDP keeps
    fp32 weights and autocasts in training; FSDP2's policy and DeepSpeed cast them already)."""
    stack = contextlib.ExitStack()
    with stack:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        engine = next((e for m, e in _ZERO3_ENGINES.items() if m is model or m is base), None)
        fsdp = _fsdp_modules(model)
        if gather and fsdp:
            stack.enter_context(_fsdp_gathered(fsdp))
        elif (
            gather
            and engine is not None
            and getattr(engine, "optimizer", None) is not None
            and _zero3_fits(engine)
        ):
            stack.enter_context(_zero3_gathered(engine))
        weights = [p for p in model.parameters() if p.is_floating_point()]
        fp32 = any(p.dtype == torch.float32 for p in weights) and not fsdp
        if dtype is not None and dtype != torch.float32 and fp32:
            device = next((p.device for p in weights), torch.device("cpu"))
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        yield


@torch.no_grad()
def greedy(
    model,
    tokenizer,
    n: int,
    encode,
    max_new_tokens: int,
    synced: bool,
    batch_size: int,
    dtype: torch.dtype | None = None,
    gather: bool = True,
) -> list[str]:
    """Greedy completions (text after the input, up to EOS) of `n` inputs, batch by batch:
    `encode(lo, hi)` gives the model inputs of inputs lo..hi, left-padded (for an empty range, on a
    rank out of inputs, a dummy batch). `synced` keeps ranks in lock-step when parameters are
    sharded; `generation_mode` gathers them once per batch."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    outs: list[str] = []
    n_batches = (n + batch_size - 1) // batch_size
    if synced:  # every rank must run the same number of generate calls
        n_batches = int(max(dist.all_gather_objects(n_batches)))
    try:
        for b in range(n_batches):
            enc = encode(b * batch_size, min((b + 1) * batch_size, n))
            with generation_mode(model, dtype, gather):
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=synced,
                )
            if b * batch_size < n:
                new = gen[:, enc["input_ids"].shape[1] :]
                outs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    device,
    synced: bool,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    gather: bool = True,
) -> list[str]:
    """Greedy completions of text prompts (`greedy`)."""

    def encode(lo: int, hi: int) -> dict:
        chunk = prompts[lo:hi] or [tokenizer.eos_token or ""]
        return tokenizer(chunk, return_tensors="pt", padding=True).to(device)

    return greedy(model, tokenizer, len(prompts), encode, max_new_tokens, synced, batch_size, dtype, gather)


def exact_match(model, tokenizer, rows: list[dict], cfg, info, sharded: bool) -> float:
    from distft.dtypes import PRECISION_DTYPES

    mine = rows[info.dp_rank :: info.dp_size]  # [tp] a replica's ranks generate the same rows
    prompts = [prompt_text(r, tokenizer) for r in mine]
    dtype = PRECISION_DTYPES[cfg.train.precision]
    outs = generate(model, tokenizer, prompts, cfg.train.max_new_tokens, info.device, sharded, dtype=dtype)
    hits = sum(o.strip() == reference_answer(r).strip() for o, r in zip(outs, mine))
    total_hits, total = dist.all_reduce_sum([hits, len(mine)], info.device)
    return total_hits / max(total, 1)
