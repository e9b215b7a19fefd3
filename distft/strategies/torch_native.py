"""The torch-native strategies' shared mechanics (DDP and FSDP2 differ only in `parallelize`):
autocast / loss scaling, clipped step, and DCP checkpoints that reshard on load."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from distft.contracts import Strategy
from distft.dtypes import PRECISION_DTYPES
from distft.parallel import cp
from distft.parallel import mesh as meshes
from distft.runtime import dist
from distft.strategies.optim import build_adamw


class TorchNativeStrategy(Strategy):
    """DDP or FSDP2 around a model; `parallelize(model, cfg, info)` does the wrapping, or
    `parallelize(model, cfg, info, mesh, shape)` when the strategy has a device mesh of `shape`
    (the FSDP2 family: `self.mesh`, built once, with dims dp_replicate, dp_shard, cp, tp)."""

    def __init__(
        self,
        cfg,
        info,
        parallelize: Callable,
        sharded: bool,
        autocast: bool,
        shape: meshes.MeshShape | None = None,
    ):
        self.cfg = cfg
        self.info = info
        self.parallelize = parallelize
        self.shape = shape
        self._mesh = None
        self.sharded_params = sharded
        self.loads_sharded = sharded  # FSDP2 reads each rank's shards of a meta-device model
        self.use_autocast = autocast and cfg.train.precision != "fp32"
        self.loss_scale = float(info.world_size)  # gradient reduction averages over ranks
        self.scaler = None
        self.async_save = True
        self.checkpoint_format = "dcp"  # DDP and FSDP2 read each other's checkpoints, at any world size
        self._ckpt_group = None
        self._stager = None

    @property
    def mesh(self):
        """The job's DeviceMesh (None for DDP); named dims dp_replicate, dp_shard, cp, tp and the
        flattened dp, dp_shard_cp, dp_cp (distft.parallel.mesh)."""
        if self._mesh is None and self.shape is not None:
            self._mesh = meshes.build(self.info.device.type, self.shape)
        return self._mesh

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.shape is None:
            return self.parallelize(model, self.cfg, self.info)
        return self.parallelize(model, self.cfg, self.info, self.mesh, self.shape)

    @property
    def cp_size(self) -> int:
        return self.shape.cp if self.shape is not None else 1

    def shard_batch(self, batch: dict) -> dict:
        """This rank's slice of each sequence under context parallelism (distft.parallel.cp);
        under cp or tp, a group's tokens are counted by its first rank only (tokens/s)."""
        if self.shape is None or self.shape.cp * self.shape.tp == 1:
            return batch
        if self.cp_size > 1:
            rank, balanced = self.mesh["cp"].get_local_rank(), cp.balanced(self.cfg.strategy.cp_style)
            batch = cp.shard_batch(batch, rank, self.cp_size, balanced)
        if "num_tokens" in batch and not self.shape.counts_tokens(self.info.rank):
            batch = {**batch, "num_tokens": 0}
        return batch

    def setup(self, model: torch.nn.Module) -> None:
        self.model = self._placed(model)
        if self.cp_size > 1:
            cp.attach(self.model, self.cfg.strategy.cp_style)
        self.module = getattr(self.model, "module", self.model)  # DDP wraps, FSDP2 does not
        self.optimizer = build_adamw(self.module, self.cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # FSDP2: the outermost fully_shard module controls gradient sync for all of them.
        self.fsdp_root = next(
            (m for m in self.model.modules() if hasattr(m, "set_requires_gradient_sync")), None
        )
        if self.cfg.train.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.info.device.type)

    def accumulate(self, is_last: bool):
        stack = contextlib.ExitStack()
        if self.fsdp_root is not None:
            self.fsdp_root.set_requires_gradient_sync(is_last)
        elif not is_last and hasattr(self.model, "no_sync"):  # DDP
            stack.enter_context(self.model.no_sync())
        if self.use_autocast:
            dtype = PRECISION_DTYPES[self.cfg.train.precision]
            stack.enter_context(torch.autocast(self.info.device.type, dtype=dtype))
        return stack

    def split(self, batch: dict):
        """Around the forward (and backward) of a batch from `shard_batch`: the model runs on the
        slices (Ulysses attention over the cp group); other forwards see whole sequences."""
        if self.cp_size == 1:
            return contextlib.nullcontext()
        balanced = cp.balanced(self.cfg.strategy.cp_style)
        return cp.active(self.mesh["cp"].get_group(), self.cp_size, cp.is_whole(batch), balanced)

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or math.inf
        if self.shape is not None and self.shape.ep > 1:
            norm = clip_over_meshes(self.params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def end_trial(self, micro: int) -> None:
        """Drop the planner's trial gradients (exact zeros) so the first real step starts clean."""
        self.optimizer.zero_grad(set_to_none=True)

    def _placed(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP: a replica on this rank's device. FSDP2: fully_shard moves each layer to the device
        as it shards it (never the whole model at once); a model built on the meta device
        (distft.models.sharded_load) then reads only this rank's shards."""
        from distft.models.sharded_load import is_meta, load_shards

        on_meta = is_meta(model)
        if not self.sharded_params:
            model.to(self.info.device)
        model = self._wrap(model)
        if on_meta:
            load_shards(model, self.info.device)
        return model

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model placed like the policy: FSDP2 shards it with the policy's plan; DDP keeps a
        plain copy on this rank's device (nothing to all-reduce)."""
        if not self.sharded_params:
            return model.to(self.info.device).eval()
        model = self._placed(model).eval()
        if self.cp_size > 1:  # a reference's forward inside the policy's split runs split too
            cp.attach(model, self.cfg.strategy.cp_style)
        return model

    # Checkpoints: DCP writes one shard per rank and reshards on load (any world size). DCP is
    # imported at the first save or load: it pulls in DTensor and sympy (~0.5 s before step 1).
    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))

    def save_async(self, path: Path):
        """Stage the state to host memory, write it in a background thread; returns the future.
        Its collectives run on a dedicated gloo group: on the default group they would interleave
        with training's collectives (FSDP2 all-gathers) and abort with a collective mismatch."""
        if self._ckpt_group is None and dist.active():
            self._ckpt_group = torch.distributed.new_group(backend="gloo")
        if self._stager is None:  # pinned host buffers on GPU, reused by every save
            from distft.strategies.staging import stager

            self._stager = stager(self.info.device)
        import torch.distributed.checkpoint as dcp

        return dcp.async_save(
            self._state(),
            checkpoint_id=str(path / "dcp"),
            process_group=self._ckpt_group,
            async_stager=self._stager,
        )

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights on rank 0, empty elsewhere; a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=opts)
        if self.shape is not None:  # fsdp/hsdp keep expert LoRA stacked by expert: PEFT's shapes
            from distft.models.expert_parallel import peft_layout

            sd = peft_layout(self.model, sd)
        return sd if self.info.is_main else {}

    def barrier(self) -> None:
        dist.barrier()


def clip_over_meshes(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for gradients on several device meshes (expert parallelism: the experts'
    mesh beside the dense one), which torch's cannot stack: each mesh's norm is reduced whole,
    then they are combined and every gradient scaled by the one coefficient."""
    groups: dict[int, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(id(getattr(p.grad, "device_mesh", None)), []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1:
        with torch.no_grad():
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
    return total
