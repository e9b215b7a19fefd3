"""Reference log-probs for DPO / KTO: where they come from, prepared for the run's strategy.

- LoRA / QLoRA (a fresh adapter): the policy itself with its adapters disabled (peft
  `disable_adapter()`): the base weights are the reference, so no second copy exists (and
  under FSDP2 / ZeRO-3 it is sharded exactly like the policy). A continued adapter
  (tuning.init_adapter) is its own reference and needs precompute_ref.
- full tuning: a frozen copy of the initial model, loaded from the same path and placed by the
  strategy like the policy (distft.methods.frozen: sharded where the strategy shards
  parameters, a replica on each rank otherwise).
- `method.precompute_ref=true`: log-probs of every train, val and test example are computed once in
  `setup` (before any update, so the policy is still the reference) and carried in the examples;
  no reference model is kept.

A resumed run rebuilds the reference the same way (setup runs before the checkpoint is loaded),
so it never needs to be checkpointed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from distft.contracts import MethodContext
from distft.dtypes import PRECISION_DTYPES
from distft.methods.logprobs import model_logps
from distft.runtime import dist
from distft.strategies.step import to_device


class Reference:
    def __init__(self, ctx: MethodContext, precompute: bool, auto_class=None):
        self.info = ctx.info
        self.precomputed = precompute
        self.autocast_dtype = None
        self.loss_chunks = ctx.cfg.train.loss_chunks
        # A run that continues a saved adapter (tuning.init_adapter) starts from that adapter, so
        # the bare base is not its reference: it needs precompute_ref (checked by the methods).
        continued = bool(getattr(ctx.cfg.tuning, "init_adapter", None))
        if ctx.tuning.adapter and not continued:
            self.kind = "adapter"
            self.model = ctx.strategy.module  # the PeftModel
        elif precompute:
            self.kind = "initial policy"
            self.model = ctx.strategy.model
        else:
            self.kind = "frozen copy"
            self.model = ctx.load_frozen(ctx.model_path, auto_class)
            if ctx.cfg.train.precision != "fp32" and not ctx.strategy.sharded_params:
                self.autocast_dtype = PRECISION_DTYPES[ctx.cfg.train.precision]  # match the policy's math

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.kind == "adapter":
            stack.enter_context(self.model.disable_adapter())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.info.device.type, dtype=self.autocast_dtype))
        return stack

    def logps(self, batch: dict) -> torch.Tensor:
        """Summed reference log-prob of every row of a collated batch ([N], float32)."""
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        if self.precomputed:
            raise RuntimeError("reference log-probs were precomputed for the train/val/test examples only")
        with self._context():
            return model_logps(self.model, batch, self.loss_chunks)[0].float()

    def precompute(self, examples: list[dict], collate: Callable, assign: Callable, batch_size: int) -> None:
        """Fill every example's reference values in place (`assign(example, row_logps)`), sharded
        over ranks and gathered on all of them."""
        model = self.model
        was_training = model.training
        model.eval()

        def run(chunk: list[dict]) -> list:
            batch = to_device(collate(chunk), self.info.device)
            with self._context():
                logps = model_logps(model, batch, self.loss_chunks)[0].float().cpu()
            n = len(chunk)
            return [logps[i::n].tolist() for i in range(n)]  # rows i, n+i, ... belong to example i

        values = map_examples(examples, run, self.info, batch_size)
        model.train(was_training)
        for ex, v in zip(examples, values):
            assign(ex, v)


def setup_reference(ctx: MethodContext, method, assign: Callable, needed: bool = True) -> Reference | None:
    """A preference method's setup: dropout off in the policy (method.disable_dropout), then the
    reference — frozen copy or adapters disabled — with its log-probs precomputed once over every
    split when method.precompute_ref (`assign` stores one example's values)."""
    m = ctx.cfg.method
    if m.disable_dropout:
        from trl.trainer.utils import disable_dropout_in_model

        disable_dropout_in_model(ctx.strategy.module)
    if not needed:
        return None
    ref = Reference(ctx, m.precompute_ref, method.auto_class)
    if m.precompute_ref:
        data = ctx.data
        ref.precompute(data.train + data.val + data.test, method.collate, assign, ctx.geometry.micro)
    return ref


def map_examples(examples: list, fn: Callable[[list], list], info, batch_size: int) -> list:
    """`fn` over `examples` in batches, each rank taking every world_size-th example; results are
    gathered so every rank gets all of them in order. Every rank calls `fn` the same number of
    times (an idle rank repeats the first example), as sharded parameters need all ranks in
    every forward."""
    if not examples:
        return []
    mine = list(range(info.rank, len(examples), info.world_size))
    per_rank = math.ceil(len(examples) / info.world_size)
    out: dict[int, object] = {}
    for b in range(math.ceil(per_rank / batch_size)):
        ids = mine[b * batch_size : (b + 1) * batch_size]
        results = fn([examples[i] for i in ids] or examples[:1])
        out.update(zip(ids, results))
    merged: dict[int, object] = {}
    for part in dist.all_gather_objects(out):
        merged.update(part)
    return [merged[i] for i in range(len(examples))]


def held_out(method, rows: list[dict]) -> list[dict]:
    """Encoded examples of held-out `rows`: the run's val or test split (with any precomputed
    reference values) when `rows` is one of them, else `rows` encoded now."""
    data = method.data
    if data is not None and rows is data.val_rows:
        return data.val
    if data is not None and rows is data.test_rows:
        return data.test
    return method.encode(rows, method.tokenizer, method.cfg, False)[0]


def check_reference(cfg, needs_reference: bool) -> None:
    """A continued adapter (tuning.init_adapter) is its own reference: only precomputing works."""
    from distft.errors import ConfigError

    if needs_reference and getattr(cfg.tuning, "init_adapter", None) and not cfg.method.precompute_ref:
        raise ConfigError(
            f"tuning.init_adapter with method={cfg.method.name}: the reference is the starting adapter, "
            "not the bare base model; set method.precompute_ref=true"
        )
