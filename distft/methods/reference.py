"""Reference log-probs for DPO / KTO: where they come from, prepared for the run's strategy.

- LoRA / QLoRA (a fresh adapter): the policy itself with its adapters disabled (peft
  `disable_adapter()`): the base weights are the reference, so no second copy exists (and
  under FSDP2 / ZeRO-3 it is sharded exactly like the policy). A continued adapter
  (tuning.init_adapter) is its own reference and needs precompute_ref.
- full tuning: a frozen copy of the initial model, loaded from the same path and prepared like
  the policy: FSDP2 shards it with the same `fully_shard` plan, ZeRO-3 partitions it with an
  optimizer-free DeepSpeed engine (what TRL's `prepare_deepspeed` does), other strategies keep a
  replica on each rank.
- `method.precompute_ref=true`: log-probs of every train, val and test example are computed once in
  `setup` (before any update, so the policy is still the reference) and carried in the examples;
  no reference model is kept.

A resumed run rebuilds the reference the same way (setup runs before the checkpoint is loaded),
so it never needs to be checkpointed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import torch

from distft.methods.logprobs import model_logps
from distft.runtime import dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Reference:
    def __init__(self, trainer, precompute: bool):
        self.info = trainer.info
        self.precomputed = precompute
        self.autocast_dtype = None
        # A run that continues a saved adapter (tuning.init_adapter) starts from that adapter, so
        # the bare base is not its reference: it needs precompute_ref (checked by the methods).
        continued = bool(getattr(trainer.cfg.tuning, "init_adapter", None))
        if trainer.tuning.adapter and not continued:
            self.kind = "adapter"
            self.model = trainer.strategy.module  # the PeftModel
        elif precompute:
            self.kind = "initial policy"
            self.model = trainer.strategy.model
        else:
            self.kind = "frozen copy"
            self.model = frozen_copy(trainer)
            if trainer.cfg.train.precision != "fp32" and not trainer.strategy.sharded_params:
                self.autocast_dtype = DTYPES[trainer.cfg.train.precision]  # match the policy's math

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
            return model_logps(self.model, batch)[0].float()

    def precompute(self, examples: list[dict], collate: Callable, assign: Callable, batch_size: int) -> None:
        """Fill every example's reference values in place (`assign(example, row_logps)`), sharded
        over ranks and gathered on all of them."""
        model = self.model
        was_training = model.training
        model.eval()

        def run(chunk: list[dict]) -> list:
            batch = to_device(collate(chunk), self.info.device)
            with self._context():
                logps = model_logps(model, batch)[0].float().cpu()
            n = len(chunk)
            return [logps[i::n].tolist() for i in range(n)]  # rows i, n+i, ... belong to example i

        values = map_examples(examples, run, self.info, batch_size)
        model.train(was_training)
        for ex, v in zip(examples, values):
            assign(ex, v)


def setup_reference(trainer, method, assign: Callable, needed: bool = True) -> Reference | None:
    """A preference method's setup: dropout off in the policy (method.disable_dropout), then the
    reference — frozen copy or adapters disabled — with its log-probs precomputed once over every
    split when method.precompute_ref (`assign` stores one example's values)."""
    m, t = trainer.cfg.method, trainer.cfg.train
    if m.disable_dropout:
        from trl.trainer.utils import disable_dropout_in_model

        disable_dropout_in_model(trainer.strategy.module)
    if not needed:
        return None
    ref = Reference(trainer, m.precompute_ref)
    if m.precompute_ref:
        data = trainer.data
        ref.precompute(data.train + data.val + data.test, method.collate, assign, t.micro_batch_size)
    return ref


def frozen_copy(trainer) -> torch.nn.Module:
    """The initial model, frozen, prepared for the run's strategy (see the module docstring)."""
    from distft.models import load_model

    cfg, info, strategy = trainer.cfg, trainer.info, trainer.strategy
    model = load_model(trainer.model_path, cfg, torch.float32, {}, trainer.method.auto_class)
    model.config.use_cache = False
    model.requires_grad_(False)
    if getattr(strategy, "engine", None) is not None and cfg.strategy.stage == 3:
        return _deepspeed_partitioned(model, strategy.config)
    model.to(info.device)
    if strategy.sharded_params and hasattr(strategy, "parallelize"):  # FSDP2: same sharding plan
        model = strategy.parallelize(model, cfg, info)
    return model.eval()


def _deepspeed_partitioned(model: torch.nn.Module, train_config: dict):
    """An optimizer-free ZeRO-3 engine around a frozen model: parameters partitioned over ranks and
    gathered layer by layer in forward."""
    import deepspeed

    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


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


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def held_out(method, rows: list[dict]) -> list[dict]:
    """Encoded examples of held-out `rows`: the run's val or test split (with any precomputed
    reference values) when `rows` is one of them, else `rows` encoded now."""
    data = method.trainer.data if method.trainer is not None else None
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
