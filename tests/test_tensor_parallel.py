"""Tensor parallelism (`strategy=fsdp strategy.tp=N`, distft/parallel/tp.py) on real gloo ranks.

Equivalences (fp32, dropout off, 5 steps, the same global batch of 4): tp=2 on 2 ranks equals one
rank, for full fine-tuning and LoRA, and dp=2 × tp=2 on 4 ranks equals dp=2 on 2 ranks (full), in
losses and exported weights. Checkpoints cross tp meshes through DCP: (dp=1, tp=2) saves step 3
and (dp=2, tp=1) resumes it, and the reverse, and (dp=2, tp=2) saves for (dp=4) to resume; losses
and exports continue the uninterrupted runs. cp=2 × tp=2 on 4 ranks (packed rows) equals one rank.
One 2-rank spawn runs all 2-rank jobs, then rank 0 alone the 1-rank references (the stack is
imported once); it also checks the sharding itself (placements, local heads, LoRA adapters
following their base layer), that a tp group counts its tokens once, and other families' plans
(Qwen2, Mistral, Gemma, Phi-3's fused projections) against the unsharded model. One 4-rank spawn
runs the dp=2 × tp=2 job, the dp=4 job that resumes its checkpoint and the cp=2 × tp=2 job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.util import FAST, free_port, max_rel_diff, train_losses

TOL = 1e-4  # relative
JOB = [
    *FAST,
    "strategy=fsdp",
    "data.num_examples=64",
    "train.max_steps=5",
    "train.precision=fp32",
    "train.lr_scheduler=constant",
    "train.lr=1e-3",
    "train.eval_generate=false",
    "data.max_eval_generations=0",
    "eval.test=false",
    "cluster.preflight=false",
]
LORA = ["tuning=lora"]
SAVE = ["train.save_every=3"]
RUNS = {  # name: (world, overrides); every job's global batch is 4 examples
    "tp2_full": (2, ["strategy.tp=2", "train.micro_batch_size=4", *SAVE]),
    "tp2_lora": (2, [*LORA, "strategy.tp=2", "train.micro_batch_size=4"]),
    "dp2_full": (2, ["train.micro_batch_size=2", *SAVE]),
    # Resume across tp meshes (DCP reshards): each continues the other's step-3 checkpoint.
    "dp2_from_tp2": (2, ["train.micro_batch_size=2", "resume={root}/tp2_full/checkpoints/step_3"]),
    "tp2_from_dp2": (
        2,
        ["strategy.tp=2", "train.micro_batch_size=4", "resume={root}/dp2_full/checkpoints/step_3"],
    ),
    "one_full": (1, ["train.micro_batch_size=4"]),
    "one_lora": (1, [*LORA, "train.micro_batch_size=4"]),
    "dp2tp2_full": (4, ["strategy.tp=2", "train.micro_batch_size=2", *SAVE]),
    "dp4_from_dp2tp2": (4, ["train.micro_batch_size=1", "resume={root}/dp2tp2_full/checkpoints/step_3"]),
    # cp=2 × tp=2 on 4 ranks (one data-parallel rank): Ulysses over each tp rank's local heads,
    # sequence parallelism inside each cp slice, packed rows.
    "cp2tp2_full": (4, ["strategy.tp=2", "strategy.cp=2", "train.micro_batch_size=4", "data.packing=true"]),
    "one_packed_full": (1, ["train.micro_batch_size=4", "data.packing=true"]),
}
SAME = {  # (tensor-parallel job, its reference) per tuning
    "full": [("tp2", "one"), ("dp2tp2", "dp2"), ("cp2tp2", "one_packed")],
    "lora": [("tp2", "one")],
}
RESUMED = [  # (resumed, uninterrupted)
    ("dp2_from_tp2", "tp2_full"),
    ("tp2_from_dp2", "dp2_full"),
    ("dp4_from_dp2tp2", "dp2tp2_full"),
]


def _placements(module) -> dict:
    """What the trained model's sharding looks like (rank 0's view)."""
    from torch.distributed.tensor import DTensor

    root = module.get_base_model() if hasattr(module, "get_base_model") else module
    out = {}
    for name, p in root.named_parameters():
        if ".layers.0." in name or "embed" in name or name.startswith("lm_head"):
            assert isinstance(p, DTensor), f"{name} is not a DTensor: parameters must share one mesh"
            tp_dim = p.device_mesh.mesh_dim_names.index("tp")
            out[name] = [str(p.placements[tp_dim]), p.requires_grad]
    return out


def _family_checks() -> dict:
    """Other families' plans on 2 ranks: logits and a sharded weight's gradient as unsharded."""
    import copy
    from types import SimpleNamespace

    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM

    from distft.parallel.tp import apply_tp

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    shape.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    shape.update(pad_token_id=0, bos_token_id=1, eos_token_id=1)
    cfg = SimpleNamespace(strategy=SimpleNamespace(tp=2, tp_sequence_parallel=True))
    cfg.tuning = SimpleNamespace(name="full")
    cfg.method = SimpleNamespace(name="sft")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = {}
    for kind, weight in (
        ("qwen2", "q_proj"),
        ("mistral", "k_proj"),
        ("gemma", "o_proj"),
        ("phi3", "qkv_proj"),
    ):
        torch.manual_seed(0)
        config = AutoConfig.for_model(kind, **shape, attn_implementation="eager")
        model = AutoModelForCausalLM.from_config(config)
        ref = copy.deepcopy(model)
        apply_tp(model, mesh, cfg)
        ids = torch.randint(0, 64, (2, 13))  # 13 tokens: an uneven split by sequence
        got, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
        got.loss.backward()
        want.loss.backward()
        g = getattr(model.model.layers[1].self_attn, weight).weight
        g_ref = getattr(ref.model.layers[1].self_attn, weight).weight.grad
        out[kind] = {
            "logits": float((got.logits - want.logits).detach().abs().max() / want.logits.abs().max()),
            "grad": float((g.grad.full_tensor() - g_ref).abs().max() / g_ref.abs().max()),
            "local_rows": g.to_local().shape[0] / g.shape[0],
            "residual": _residual_placement(model, ids),
        }
    return out


def _residual_placement(model, ids) -> str:
    """How the residual stream reaches the second decoder layer: "S(1)" (split by sequence) with
    sequence parallelism, "local" without."""
    from torch.distributed.tensor import DTensor

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = []

    def look(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(str(x.placements[-1]) if isinstance(x, DTensor) else "local")

    handle = root.model.layers[1].register_forward_pre_hook(look, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def _tokens_counted(trainer) -> tuple[float, float]:
    """(tokens the job counts for one batch over all ranks, the batch's tokens): tokens/s."""
    from distft.runtime import dist

    batch = trainer.method.collate(list(trainer.data.train[:4]))
    (counted,) = dist.all_reduce_sum([trainer.strategy.shard_batch(batch)["num_tokens"]], trainer.info.device)
    return counted, float(batch["num_tokens"])


def _job(root: str, name: str, out: dict) -> None:
    from distft.config.load import load_config
    from distft.engine.trainer import Trainer

    overrides = [o.format(root=root) for o in RUNS[name][1]]
    cfg, composed = load_config([*JOB, *overrides, f"output_dir={Path(root) / name}"])
    trainer = Trainer.build(cfg, composed)
    trainer.train()  # exports: full weights, or the adapter
    if name.startswith("tp2_"):
        out[name] = _placements(trainer.strategy.module)
        ids = torch.tensor([trainer.data.train[0]["input_ids"][:9]])  # 9 tokens: uneven
        out[name]["residual"] = _residual_placement(trainer.strategy.module, ids)
    if name == "tp2_full":
        out["tokens"] = _tokens_counted(trainer)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    out: dict = {}
    for name, (w, _) in RUNS.items():
        if w == world:
            _job(root, name, out)
    if world == 2:
        out["families"] = _family_checks()
    torch.distributed.destroy_process_group()
    if world == 2 and rank == 0:  # the 1-rank references, in this process
        os.environ.update({"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        for name, (w, _) in RUNS.items():
            if w == 1:
                _job(root, name, out)
    if rank == 0:
        (Path(root) / f"checks_{world}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("tp")
    checks = {}
    for world in (2, 4):
        mp.spawn(_worker, args=(world, free_port(), str(root)), nprocs=world, join=True)
        checks.update(json.loads((root / f"checks_{world}.json").read_text()))
    return root, checks


def _exported(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    export = run_dir / "export"
    adapter = export / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else export / "model.safetensors"))


def _differences(root: Path, tuning: str) -> dict[str, tuple[float, float]]:
    """(largest relative loss difference, largest relative weight difference) per pair."""
    out = {}
    for job, ref in SAME[tuning]:
        a, b = root / f"{job}_{tuning}", root / f"{ref}_{tuning}"
        la, lb = train_losses(a), train_losses(b)
        assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5], (la, lb)
        loss = max(abs(la[s] - lb[s]) / abs(lb[s]) for s in lb)
        out[f"{job} vs {ref}"] = (loss, max_rel_diff(_exported(a), _exported(b)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_tensor_parallel_equals_data_parallel(runs, tuning):
    root, _ = runs
    diffs = _differences(root, tuning)
    print(tuning, diffs)
    for pair, (loss, weights) in diffs.items():
        assert loss <= TOL and weights <= TOL, f"{tuning} {pair}: losses {loss:.3g}, weights {weights:.3g}"
    # The runs trained: losses fell and the exported weights moved from the base.
    losses = train_losses(root / f"tp2_{tuning}")
    assert losses[5] < losses[1]
    exported = _exported(root / f"tp2_{tuning}")
    assert all(not hasattr(v, "device_mesh") for v in exported.values())  # plain HF tensors
    if tuning == "full":
        from safetensors.torch import load_file

        base = load_file(str(root / "tp2_full" / "base_model" / "model.safetensors"))
        assert max_rel_diff(exported, {k: base[k] for k in exported}) > 1e-3
        assert exported["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)  # gathered, not a shard
    else:
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in exported.items())


@pytest.mark.slow
def test_checkpoints_resume_across_tensor_parallel_meshes(runs):
    """(dp=1, tp=2) → (dp=2, tp=1), the reverse, and (dp=2, tp=2) → (dp=4): steps 4-5 and the
    export continue the uninterrupted run; the export is plain Hugging Face weights either way."""
    root, _ = runs
    for resumed, whole in RESUMED:
        la, lb = train_losses(root / resumed), train_losses(root / whole)
        assert sorted(la) == [4, 5], la  # it resumed at step 3
        loss = max(abs(la[s] - lb[s]) / abs(lb[s]) for s in la)
        weights = max_rel_diff(_exported(root / resumed), _exported(root / whole))
        print(f"{resumed} vs {whole}: losses {loss:.2e}, weights {weights:.2e}")
        assert loss <= TOL and weights <= TOL, (resumed, loss, weights)
        q = _exported(root / resumed)["model.layers.0.self_attn.q_proj.weight"]
        assert q.shape == (128, 128)  # whole, not a tp shard


@pytest.mark.slow
def test_a_tensor_parallel_group_counts_its_tokens_once(runs):
    _, checks = runs
    counted, batch_tokens = checks["tokens"]
    assert counted == batch_tokens > 0  # dp=1: the tp=2 ranks hold the same batch (was 2×)


@pytest.mark.slow
def test_sharding_follows_the_plan(runs):
    _, checks = runs
    full, lora = checks["tp2_full"], checks["tp2_lora"]
    layer = "model.layers.0."
    assert full[layer + "self_attn.q_proj.weight"][0] == "S(0)"  # colwise
    assert full[layer + "self_attn.o_proj.weight"][0] == "S(1)"  # rowwise
    assert full[layer + "mlp.up_proj.weight"][0] == "S(0)"
    assert full[layer + "mlp.down_proj.weight"][0] == "S(1)"
    assert full[layer + "input_layernorm.weight"][0] == "R"
    assert full["model.embed_tokens.weight"][0] == "R"
    # LoRA: B column-sharded under a colwise base, A row-sharded under a rowwise base; base frozen.
    q, o = layer + "self_attn.q_proj.", layer + "self_attn.o_proj."
    assert lora[q + "base_layer.weight"] == ["S(0)", False]
    assert lora[q + "lora_B.default.weight"] == ["S(0)", True]
    assert lora[q + "lora_A.default.weight"] == ["R", True]
    assert lora[o + "lora_A.default.weight"] == ["S(1)", True]
    assert lora[o + "lora_B.default.weight"] == ["R", True]
    # Sequence parallelism (on by default): the residual stream between layers is split by sequence.
    assert full["residual"] == lora["residual"] == "S(1)"


@pytest.mark.slow
def test_other_families_match_unsharded(runs):
    _, checks = runs
    for kind, c in checks["families"].items():
        assert c["logits"] < 1e-5 and c["grad"] < 1e-5, (kind, c)
        if kind != "gemma":  # o_proj is rowwise: its output rows are whole
            assert c["local_rows"] == 0.5, (kind, c)
        # Plain plans split the residual stream by sequence; Phi-3's gathered outputs do not.
        assert c["residual"] == ("local" if kind == "phi3" else "S(1)"), (kind, c)


@pytest.mark.quick
@pytest.mark.parametrize(
    "overrides, words",
    [
        (["tuning=qlora", "strategy.tp=2"], "NF4-quantized weights cannot be split"),
        (
            ["strategy.tp=2", "model.hidden_size=96", "model.num_heads=3", "model.num_kv_heads=3"],
            "does not divide the model's 3 attention heads",
        ),
        (["strategy.tp=2", "model.num_kv_heads=1"], "does not divide the model's 1 key/value heads"),
        (["strategy.tp=2", "method=dpo"], "verified for method=sft only"),
        (["strategy.tp=2", "tuning=dora"], "verified for tuning=full|lora only"),
    ],
)
def test_impossible_tensor_parallel_setups_are_refused(overrides, words):
    from distft.config.load import load_config
    from distft.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_config(["strategy=fsdp", *overrides])


@pytest.mark.quick
def test_world_not_divisible_by_tp_is_refused():
    from distft.config.load import load_config
    from distft.errors import ConfigError
    from distft.parallel import tp

    cfg, _ = load_config(["strategy=fsdp", "strategy.tp=2"])
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        tp.validate(cfg, world=3)
    tp.validate(cfg, world=4)


@pytest.mark.slow
def test_verify_tensor_parallel_check(runs):
    """distft-verify's tensor-parallel check: the run it asks for (the same global batch at the
    other tp degree) and its verdict, on this module's runs (tp=2 vs dp=2, same global batch)."""
    from distft.config.load import load_config
    from distft.verify.cli import _tensor_parallel

    root, _ = runs
    asked = []

    def train(name, nproc, *extra):
        asked.append((nproc, *extra))
        return root / "tp2_full"

    cfg, _ = load_config(["strategy=fsdp"])
    check = _tensor_parallel(cfg, train, root / "dp2_full", 2, 5, 1e-4)
    assert asked == [(2, "strategy.tp=2", "train.micro_batch_size=2", "train.grad_accum=2")]
    assert check.passed, check
    assert float(check.measured.split()[0]) <= 1e-4
    check = _tensor_parallel(cfg, lambda *a: root / "one_lora", root / "dp2_full", 2, 5, 1e-4)
    assert check.passed is False  # a different run does not pass
    for other in (["strategy=zero2"], ["strategy=fsdp", "method=dpo"]):
        cfg, _ = load_config(other)
        assert _tensor_parallel(cfg, train, root, 2, 5, 1e-4).passed is None  # n/a


@pytest.mark.quick
def test_attention_head_counts_become_local():
    """Attention modules that keep head counts (remote-code and older families) get their local
    share; Llama-style ones reshape with -1 and keep none."""
    from distft.parallel.tp import _split_heads

    attn = torch.nn.Module()
    attn.num_heads, attn.num_key_value_heads, attn.head_dim = 8, 4, 16
    _split_heads(attn, 2)
    assert (attn.num_heads, attn.num_key_value_heads, attn.head_dim) == (4, 2, 16)
