"""Sharded loading on every parameter-sharding strategy, in one pair of spawned gloo ranks (as
tests/test_strategies_multirank.py): fsdp, hsdp and zero3, full and LoRA, from a model directory and
from a hub-style cache. Each rank must hold about 1/N of the model's parameters both while loading
(what `build.model` hands the strategy: meta tensors for FSDP2, ZeRO-3 partitions) and after
setup; and a sharded load must train like a full load (every rank loading the whole model)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from tests.util import FAST, free_port

JOB = [
    *FAST,
    "data.num_examples=64",
    "train.max_steps=2",
    "train.eval_generate=false",
    "train.export=none",
    "eval.test=false",
]
JOB += ["cluster.preflight=false", "train.eval_every=0", "train.save_every=0"]
# (strategy, tuning, source): each strategy sees full and a LoRA kind, and both sources; QLoRA
# (each rank quantizes and keeps its rows of the 4-bit base; on ZeRO-3 its partitions), DoRA
# (magnitudes computed from the shards read) and LoRA continued from a saved adapter (lora+init)
# load sharded too.
MEMORY = [
    ("fsdp", "full", "dir"),
    ("fsdp", "lora+init", "hub"),
    ("fsdp", "qlora", "hub"),
    ("hsdp", "full", "hub"),
    ("hsdp", "dora", "dir"),
    ("zero3", "full", "dir"),
    ("zero3", "lora", "hub"),
    ("zero3", "qlora", "dir"),
]
# Trained again with sharded loading switched off: the losses must match.
EQUIVALENCE = [
    ("fsdp", "lora+init", "hub"),
    ("fsdp", "qlora", "hub"),
    ("hsdp", "dora", "dir"),
    ("zero3", "lora", "hub"),
    ("zero3", "qlora", "dir"),
]
GENERATION = [("fsdp", "lora+init", "hub"), ("zero3", "lora", "hub")]  # checked on the sharded runs


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter data this rank holds: nothing for meta tensors, the local shard of an
    FSDP2 DTensor, the partition of a ZeRO-3 parameter."""
    out, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = [p.to_local() if hasattr(p, "to_local") else p.data]  # ZeRO-3: empty unless gathered
        parts += [p.ds_tensor] if hasattr(p, "ds_tensor") else []  # or persistent (small weights)
        out += sum(0 if t.is_meta else t.numel() * t.element_size() for t in parts)
    return out


def _full_bytes(model: torch.nn.Module) -> int:
    out, seen = 0, set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
    return out


@contextlib.contextmanager
def _counting_all_gathers():
    """Counts every all-gather launched inside: torch's (FSDP2) and DeepSpeed's backend (ZeRO-3)."""
    import deepspeed.comm.comm as ds_comm

    calls = [0]
    targets = [(torch.distributed, n) for n in ("all_gather_single", "all_gather_into_tensor", "all_gather")]
    if ds_comm.cdb is not None:
        targets += [(ds_comm.cdb, n) for n in dir(ds_comm.cdb) if n.startswith(("all_gather", "allgather"))]
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets if callable(getattr(obj, name, None))]

    def counted(fn):
        def call(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)

        return call

    for obj, name, fn in saved:
        setattr(obj, name, counted(fn))
    try:
        yield calls
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def _generation_check(trainer) -> dict:
    """All-gathers and tokens of generate for 2 and 6 new tokens, gathered once and per layer."""
    from distft.models.generation import generation_mode

    model, tok = trainer.strategy.module, trainer.tokenizer
    enc = tok(["abc", "hello"], return_tensors="pt", padding=True)
    out: dict = {}
    for gather in (True, False):
        for n in (2, 6):
            with _counting_all_gathers() as calls, torch.no_grad(), generation_mode(model, None, gather):
                ids = model.generate(
                    **enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, synced_gpus=True,
                    pad_token_id=tok.pad_token_id,
                )  # fmt: skip
            out[f"{gather}-{n}"] = {"all_gathers": calls[0], "tokens": ids.tolist()}
    return out


def _worker(rank: int, world: int, port: int, root: str, sources: dict) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    os.environ.update({"HF_HUB_CACHE": sources["cache"], "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_CACHE = sources["cache"]
    huggingface_hub.constants.HF_HUB_OFFLINE = True

    from distft.config.load import load_config
    from distft.engine import build
    from distft.engine.trainer import Trainer
    from distft.models import sharded_load
    from distft.strategies.deepspeed_zero import DeepSpeedStrategy

    seen: dict = {}
    build_model = build.model

    def recording(*args, **kwargs):
        model = build_model(*args, **kwargs)
        seen["loaded"], seen["loaded_full"] = _held_bytes(model), _full_bytes(model)
        return model

    build.model = recording

    def run(strategy: str, tuning: str, source: str, tag: str, steps: bool = True) -> dict:
        path = sources["dir"] if source == "dir" else "distft/tiny"
        name, _, variant = tuning.partition("+")
        variants = {
            "": [],
            "init": [f"tuning.init_adapter={sources['adapter']}"],  # continue from a saved adapter
            "cls": ["method=classify", "train.precision=bf16"],  # a bf16 base, fp32 LoRA and head
        }
        overrides = [*JOB, f"strategy={strategy}", f"tuning={name}", f"model.name_or_path={path}"]
        overrides += variants[variant]
        cfg, composed = load_config([*overrides, f"output_dir={Path(root) / tag}"])
        trainer = Trainer.build(cfg, composed)
        module = trainer.strategy.module
        held, full = _held_bytes(module), _full_bytes(module)
        out = {"held": held, "full": full, **seen}
        if steps:
            trainer.train()
            rows = [json.loads(x) for x in (Path(root) / tag / "metrics.jsonl").read_text().splitlines()]
            out["losses"] = [r["loss"] for r in rows if "loss" in r]
        if (strategy, tuning, source) in GENERATION:
            out["generation"] = _generation_check(trainer)
        del trainer, module
        return out

    results: dict = {}
    for combo in MEMORY:
        results["sharded/" + "-".join(combo)] = run(*combo, "-".join(combo), combo in EQUIVALENCE)
    results["bf16-classify"] = run("fsdp", "lora+cls", "dir", "bf16-classify")
    # The same jobs with every rank loading the whole model (the path before sharded loading).
    sharded_load.meta_model = lambda *a, **k: None
    DeepSpeedStrategy.load_context = lambda self: contextlib.nullcontext()
    for combo in EQUIVALENCE:
        results["whole/" + "-".join(combo)] = run(*combo, "whole-" + "-".join(combo))
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _saved_adapter(root: Path) -> str:
    """A LoRA adapter of the tiny model with non-zero B (so that continuing from it differs from a
    fresh adapter), as tuning.init_adapter reads it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from distft.config.load import load_config
    from distft.tuning import lora

    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(root / "src"), lora.peft_config(load_config(["tuning=lora"])[0])
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft.save_pretrained(root / "adapter")
    return str(root / "adapter")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    from distft.config.load import load_config
    from tests.test_sharded_load import _hub_cache

    root = tmp_path_factory.mktemp("sharded")
    cache = _hub_cache(root, load_config([])[0])  # also builds the directory root/src
    sources = {"dir": str(root / "src"), "cache": str(cache), "adapter": _saved_adapter(root)}
    mp.spawn(_worker, args=(2, free_port(), str(root), sources), nprocs=2, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("combo", MEMORY, ids=["-".join(c) for c in MEMORY])
def test_each_rank_holds_about_half_the_parameters_while_loading_and_after(sharded_runs, combo):
    for rank, results in enumerate(sharded_runs):
        r = results["sharded/" + "-".join(combo)]
        # ZeRO-3 keeps parameters under its persistence threshold (norm weights) whole on every
        # rank; LoRA's adapters exist whole on each rank until the strategy shards them.
        assert r["held"] <= 1.1 * r["full"] / 2, f"rank {rank}: {r} (bytes after setup)"
        assert r["loaded"] <= 1.1 * r["loaded_full"] / 2, f"rank {rank}: {r} (bytes while loading)"
        assert len(r.get("losses", [0, 0])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("combo", EQUIVALENCE, ids=["-".join(c) for c in EQUIVALENCE])
def test_sharded_load_trains_like_a_whole_load(sharded_runs, combo):
    name = "-".join(combo)
    for results in sharded_runs:
        whole = results["whole/" + name]
        assert whole["loaded"] >= whole["loaded_full"] * 0.99  # the comparison really loaded everything
        sharded = results["sharded/" + name]["losses"]
        assert sharded == pytest.approx(whole["losses"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("combo", GENERATION, ids=["-".join(c) for c in GENERATION])
def test_generation_gathers_once_per_call(sharded_runs, combo):
    for results in sharded_runs:
        g = results["sharded/" + "-".join(combo)]["generation"]
        once_2, once_6 = g["True-2"]["all_gathers"], g["True-6"]["all_gathers"]
        per_2, per_6 = g["False-2"]["all_gathers"], g["False-6"]["all_gathers"]
        assert per_6 > per_2 > once_2 > 0, g  # per layer per token without gathering
        assert once_2 == once_6, g  # gathered once, whatever the number of tokens
        assert g["True-6"]["tokens"] == g["False-6"]["tokens"]  # the same generations


@pytest.mark.slow
def test_lora_bf16_on_fsdp_trains_with_a_bf16_base(sharded_runs):
    """FSDP2 needs one dtype among a unit's trainable weights: a bf16 base with fp32 LoRA and an
    fp32 classification head trains (moved here from tests/test_gpu_paths.py: one spawn fewer)."""
    import math

    for results in sharded_runs:
        losses = results["bf16-classify"]["losses"]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
