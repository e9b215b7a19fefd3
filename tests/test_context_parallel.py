"""Context parallelism (strategy.cp: Ulysses, all-gather and ring) and the FSDP2 family's device mesh.

One pair of real gloo processes spawned inside pytest runs, in turn: cp=2 on 2 ranks with packing
off and on (and all-gather and ring attention with packing); dp=2 saving a checkpoint that cp=2 (dp=1)
resumes through DCP; DPO, KTO, GRPO and PPO under cp=2 (whole-row losses; DPO with ring and KTO
with all-gather attention too); then rank 0 alone runs
the 1-rank references. fp32, dropout off, the same global batch: losses and final parameters must
agree within 1e-4 relative. Quick single-process tests cover the batch slicing, token counting
and the one-line config errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.util import FAST, free_port

STEPS = 5
TOL = 1e-4
JOB = [
    *FAST,
    f"train.max_steps={STEPS}",
    "train.precision=fp32",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.eval_every=0",
    "train.eval_generate=false",
    "data.max_eval_generations=0",
    "data.num_examples=120",
    "train.export=none",
    "eval.test=false",
    "cluster.preflight=false",
    "logger=none",
]
CP = ["strategy=fsdp", "strategy.cp=2"]
# Whole-row losses under cp (distft.parallel.cp.WHOLE): DPO's pair sums; GRPO's policy loss on
# prompt+completion rows (generation unsplit; two epochs × two minibatches: π_old from its own pass).
DPO = ["method=dpo", "data.num_examples=60"]
KTO = ["method=kto", "data.num_examples=60", "train.max_steps=3"]  # example + KL partner, whole rows
GRPO = [
    "method=grpo",
    "method.sft_warmup_steps=2",
    "method.sft_warmup_batch=8",
    "method.num_prompts=64",
    "method.max_new_tokens=4",
    "method.num_generations=2",
    "method.mini_batches=2",
    "method.epochs=2",
    "train.max_steps=3",
]
PPO = [
    "method=ppo",
    *(o for o in GRPO[1:] if "num_generations" not in o),
    "method.kl_coef=0.05",
]  # PPO's critic (its own strategy) runs split too


def _run(root: Path, name: str, rank: int, *overrides: str) -> None:
    from distft.config.load import load_config
    from distft.engine.trainer import Trainer

    cfg, composed = load_config([*JOB, *overrides, f"output_dir={root / name}"])
    trainer = Trainer.build(cfg, composed)
    trainer.train()
    st = trainer.strategy
    sd = st.full_state_dict()  # a collective
    if rank == 0:
        torch.save({k: v.double() for k, v in sd.items()}, root / name / "final.pt")
        layout = {"dp": trainer.geometry.dp, "cp": st.mesh["cp"].size() if st.mesh is not None else 1}
        layout["attn"] = st.module.config._attn_implementation
        (root / name / "layout.json").write_text(json.dumps(layout))


def _worker(rank: int, world: int, port: int, root: str) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    root_p = Path(root)
    _run(root_p, "cp_nopack", rank, *CP, "data.packing=false")
    _run(root_p, "cp_pack", rank, *CP, "data.packing=true")
    _run(root_p, "ag_pack", rank, *CP, "strategy.cp_style=allgather", "data.packing=true")
    _run(root_p, "ring_pack", rank, *CP, "strategy.cp_style=ring", "data.packing=true", "train.loss_chunks=2")
    _run(root_p, "ring_nopack", rank, *CP, "strategy.cp_style=ring", "data.packing=false")
    # Resume across meshes: dp=2 × micro 2 saves step 3; dp=1 × cp=2 × micro 4 continues it.
    _run(
        root_p,
        "dp2",
        rank,
        "strategy=fsdp",
        "data.packing=false",
        "train.micro_batch_size=2",
        "train.save_every=3",
    )
    step3 = root_p / "dp2" / "checkpoints" / "step_3"
    _run(root_p, "cp_resumed", rank, *CP, "data.packing=false", f"resume={step3}")
    _run(root_p, "cp_dpo", rank, *CP, *DPO)
    _run(root_p, "cp_kto", rank, *CP, *KTO)
    _run(root_p, "ring_dpo", rank, *CP, "strategy.cp_style=ring", *DPO)
    _run(root_p, "ag_kto", rank, *CP, "strategy.cp_style=allgather", *KTO)
    _run(root_p, "cp_grpo", rank, *CP, *GRPO)
    _run(root_p, "cp_ppo", rank, *CP, *PPO)
    torch.distributed.destroy_process_group()
    if rank == 0:  # the 1-rank references, in this process (the stack is imported already)
        os.environ.update({"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        _run(root_p, "one_nopack", 0, "strategy=ddp", "data.packing=false")
        _run(root_p, "one_pack", 0, "strategy=ddp", "data.packing=true")
        _run(root_p, "one_dpo", 0, "strategy=ddp", *DPO)
        _run(root_p, "one_kto", 0, "strategy=ddp", *KTO)
        _run(root_p, "one_grpo", 0, "strategy=ddp", *GRPO)
        _run(root_p, "one_ppo", 0, "strategy=ddp", *PPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def loss_diff(a: Path, b: Path, steps, key: str = "loss") -> float:
    la, lb = _losses(a, key), _losses(b, key)
    assert all(s in la and s in lb for s in steps), (sorted(la), sorted(lb))
    return max(abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-6) for s in steps)  # KTO's kl starts at 0


def param_diff(a: Path, b: Path) -> float:
    """Largest relative difference ||a - b|| / ||b|| of any final weight tensor. (Element-wise
    maxima are not a fair measure: Adam turns rounding noise on near-zero gradients into full-size
    steps; plain dp=2 vs 1 rank differs by 1.4e-4 element-wise and 3e-6 by this measure.)"""
    sa, sb = torch.load(a / "final.pt"), torch.load(b / "final.pt")
    assert sa.keys() == sb.keys() and sa
    return max(float((sa[k] - sb[k]).norm() / sb[k].norm().clamp_min(1e-12)) for k in sa)


@pytest.mark.slow
def test_ulysses_cp2_equals_one_rank_packing_off_and_on(runs):
    report = {}
    for packing in ("nopack", "pack"):
        cp, one = runs / f"cp_{packing}", runs / f"one_{packing}"
        steps = range(1, STEPS + 1)
        # The held-out loss at the end runs split too (each rank scores its slice of each sequence).
        report[packing] = (
            loss_diff(cp, one, steps),
            param_diff(cp, one),
            loss_diff(cp, one, [STEPS], "eval/loss"),
        )
    print("cp=2 vs 1 rank (loss, params, eval loss; rel):", report)
    layout = json.loads((runs / "cp_pack" / "layout.json").read_text())
    assert layout == {"dp": 1, "cp": 2, "attn": "distft_ulysses"}, layout  # the runs were context parallel
    for packing, diffs in report.items():
        assert max(diffs) <= TOL, f"packing {packing}: losses, params, eval loss differ by {diffs} rel"
    # The runs really differ from each other (packing changes the batches): the check can fail.
    assert loss_diff(runs / "cp_pack", runs / "cp_nopack", [1]) > TOL


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ag_pack", "ring_pack", "ring_nopack"])
def test_allgather_and_ring_cp2_equal_one_rank(runs, run):
    """cp_style=allgather (each rank's query slice against the all-gathered whole-sequence keys and
    values, the packing mask's rows of the slice) and cp_style=ring (key/value blocks passed round,
    merged by log-sum-exp, backward by a second turn; packed with chunked loss, and unpacked): the
    same losses, weights and held-out loss as 1 rank."""
    style = {"ag": "allgather", "ring": "ring"}[run.split("_")[0]]
    mine, one = runs / run, runs / f"one_{run.split('_')[1]}"
    steps = range(1, STEPS + 1)
    diffs = (loss_diff(mine, one, steps), param_diff(mine, one), loss_diff(mine, one, [STEPS], "eval/loss"))
    print(f"{run} cp=2 vs 1 rank (loss, params, eval loss; rel):", diffs)
    layout = json.loads((mine / "layout.json").read_text())
    assert layout == {"dp": 1, "cp": 2, "attn": f"distft_cp_{style}"}, layout
    assert max(diffs) <= TOL, diffs


@pytest.mark.slow
def test_checkpoint_of_dp2_resumes_with_cp2_through_dcp(runs):
    dl = loss_diff(runs / "cp_resumed", runs / "dp2", range(4, STEPS + 1))
    dp = param_diff(runs / "cp_resumed", runs / "dp2")
    print(f"dp=2 → cp=2 resume (loss rel, params rel): {dl:.2e} {dp:.2e}")
    assert dl <= TOL and dp <= TOL


@pytest.mark.slow
def test_dpo_kto_grpo_and_ppo_under_cp2_equal_one_rank(runs):
    """Both sequences of each DPO pair, KTO's examples beside their KL partners and the RL methods'
    prompt+completion rows are split along the sequence (logits gathered back; generation
    unsplit): the same losses, metrics, gradient norms and final weights as 1 rank. (The weights
    move little in 3-5 steps; the losses and gradient norms are the sharper check.)"""
    report = {}
    cases = {
        "dpo": (STEPS, ("loss", "logps/chosen", "grad_norm")),
        "kto": (3, ("loss", "kl", "rewards/chosen", "grad_norm")),
        "grpo": (3, ("loss", "reward", "grad_norm")),
        "ppo": (3, ("loss", "value_loss", "grad_norm", "critic_grad_norm")),
    }
    cases["ring_dpo"], cases["ag_kto"] = cases["dpo"], cases["kto"]  # the other attention styles
    attn = {"ring": "distft_cp_ring", "ag": "distft_cp_allgather"}
    for name, (steps, keys) in cases.items():
        style, _, method = name.rpartition("_")
        cp, one = runs / (name if style else f"cp_{name}"), runs / f"one_{method}"
        report[name] = {k: loss_diff(cp, one, range(1, steps + 1), k) for k in keys}
        report[name]["params"] = param_diff(cp, one)
        layout = json.loads((cp / "layout.json").read_text())
        assert layout == {"dp": 1, "cp": 2, "attn": attn.get(style, "distft_ulysses")}, layout
    print("cp=2 vs 1 rank, whole-row methods (rel):", report)
    for name, diffs in report.items():
        # Ring's blockwise softmax rounds differently (~1e-7 in step 1's gradients); DPO's first Adam
        # steps, ~lr·sign(g) on weights whose gradients are near zero, turn that into 8e-5 in the
        # final weights here (losses and gradient norms stay well inside TOL): 2·TOL for those.
        tol = {"params": 2 * TOL} if name == "ring_dpo" else {}
        assert all(v <= tol.get(k, TOL) for k, v in diffs.items()), f"{name}: {diffs}"
    # The RL steps really updated (non-zero losses).
    assert all(any(abs(v) > 0 for v in _losses(runs / f"cp_{n}").values()) for n in ("grpo", "ppo"))


# ------------------------------------------------------------------ single process, quick
@pytest.mark.quick
def test_shard_batch_scores_every_target_once_with_global_positions():
    from distft.data.collate import pad_batch
    from distft.parallel.cp import WHOLE, shard_batch

    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]},
    ]
    batch = pad_batch(rows, pad_id=0)  # width 5: padded to 6 for cp=2, chunks of 3 (+1 look-ahead)
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    assert sum(p["num_targets"] for p in parts) == batch["num_targets"] == 5
    assert [p["input_ids"].shape[1] for p in parts] == [4, 4]
    # The scored labels (labels[:, 1:] of each slice) tile the whole row's shifted labels.
    scored = torch.cat([p["labels"][:, 1:] for p in parts], 1)[:, : batch["labels"].shape[1] - 1]
    assert torch.equal(scored, batch["labels"][:, 1:])
    assert parts[1]["position_ids"][0].tolist() == [1, 2, 3, 4]  # global, continuing the last run
    assert [p["num_tokens"] for p in parts] == [batch["num_tokens"]] * 2  # the strategy counts once
    # Balanced (ring): 4 chunks of 2 (width 8), rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    parts = [shard_batch(batch, r, 2, balanced=True) for r in range(2)]
    assert sum(p["num_targets"] for p in parts) == 5
    assert parts[0]["position_ids"][0].tolist() == [0, 1, 4, 5, 6]  # row 0's padded positions 0 1 0 1 2 3 4 5
    assert parts[1]["input_ids"][0, :4].tolist() == [7, 8, 9, 9]  # chunks 1, 2: tokens 2-5 (5 repeats 4)
    assert parts[1]["labels"][0, 1:].tolist() == [8, 9, -100, -100]  # each token's own target
    # A whole-row batch (DPO's pairs) stays whole on every rank of the group.
    whole = shard_batch({**batch, WHOLE: True}, 1, 2)
    assert torch.equal(whole["input_ids"], batch["input_ids"]) and whole["num_targets"] == 5


@pytest.mark.quick
def test_a_context_or_tensor_group_counts_its_tokens_once():
    """tokens/s: the ranks of one cp × tp group hold the same examples; only the first counts them."""
    from distft.parallel.mesh import MeshShape

    for shape in (MeshShape(1, 2, 1, 2), MeshShape(1, 1, 2, 1), MeshShape(2, 1, 2, 2), MeshShape(1, 4, 1, 1)):
        counting = [r for r in range(shape.world) if shape.counts_tokens(r)]
        assert len(counting) == shape.dp, (shape, counting)
        assert sorted({shape.dp_rank(r) for r in counting}) == list(range(shape.dp))  # one per dp rank


@pytest.mark.quick
def test_cp_config_errors_are_one_line():
    from distft.config.load import load_config, validate
    from distft.errors import ConfigError

    cases = {
        ("strategy.cp=3",): "does not divide the world size 2",
        ("strategy.cp=2", "model.num_heads=3", "model.num_kv_heads=3"): "divisible by cp",
        ("strategy.cp=2", "method=reward"): "not yet method=reward",
        ("strategy.cp=2", "method=dpo", "train.loss_chunks=2"): "set train.loss_chunks=0",
    }
    for extra, words in cases.items():
        with pytest.raises(ConfigError, match=words) as e:
            validate(load_config(["strategy=fsdp", *extra])[0])
        assert "\n" not in str(e.value)
    for other in ("ddp", "zero2"):
        with pytest.raises(ConfigError, match="strategy=fsdp") as e:
            load_config([f"strategy={other}", "strategy.cp=2"])
        assert "\n" not in str(e.value)


def _ring_worker(rank: int, world: int, port: int) -> None:
    """Ring attention on this rank's chunks against sdpa over the whole sequence (float64 inputs;
    the ring computes in fp32): outputs and q/k/v gradients, with grouped heads, with and without
    packing and a sliding window, through the CPU flash kernel and the plain-matmul path (GPU's),
    on balanced (two chunks a rank) and contiguous layouts."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from distft.parallel import cp, ring

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    b, heads, kv_heads, length, d = 2, 4, 2, 8 * world, 8
    q, dout = torch.randn(b, heads, length, d).double(), torch.randn(b, length, heads, d).double()
    k, v = torch.randn(b, kv_heads, length, d).double(), torch.randn(b, kv_heads, length, d).double()
    packed = torch.arange(length).repeat(b, 1)
    packed[0, 5:] -= 5  # examples of 5, 12 and 7 tokens in row 0, 13 and 11 in row 1
    packed[0, 17:] -= 12
    packed[1, 13:] -= 13
    plain = torch.arange(length).repeat(b, 1)
    fused = ring._fused
    cases = [  # positions, window, CPU flash kernel, balanced chunks
        (plain, None, True, True),
        (packed, None, True, True),
        (packed, 6, True, True),
        (packed, 6, False, True),
        (plain, None, False, True),
        (packed, None, True, False),
        (plain, None, False, False),
    ]
    for pos, window, use_fused, balanced in cases:
        ring._fused = fused if use_fused else (lambda q: False)
        ring.TILE = 2 * heads * 3 * 8  # the matmul path in tiles of 3 query rows
        rows = cp.positions_index(length, rank, world, balanced)
        module = type("Layer", (), {"sliding_window": window})()
        with cp.active(dist.group.WORLD, world, balanced=balanced):
            cp._STATE.positions = pos
            mask = cp._mask(window)
            if mask is None:
                mask = torch.ones(length, length, dtype=torch.bool).tril()
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            kr, vr = (t.repeat_interleave(heads // kv_heads, 1) for t in ref_in[1:])
            ref = F.scaled_dot_product_attention(ref_in[0], kr, vr, attn_mask=mask).transpose(1, 2)
            ref.backward(dout)
            mine = [t[:, :, rows].clone().requires_grad_() for t in (q, k, v)]
            out, _ = ring.ring_attention(module, *mine, None, scaling=d**-0.5)
            out.backward(dout[:, rows])
        pairs = [(out, ref[:, rows])] + [(m.grad, r.grad[:, :, rows]) for m, r in zip(mine, ref_in)]
        errs = [float((a - r).detach().abs().max()) for a, r in pairs]
        assert max(errs) < 1e-5, (rank, window, use_fused, balanced, errs)
        assert all(float(r.detach().abs().max()) > 0.1 for _, r in pairs)  # the compared values are not ~0
    ring._fused = fused
    dist.destroy_process_group()


@pytest.mark.slow
def test_ring_attention_equals_whole_sequence_attention_on_3_ranks():
    import torch.multiprocessing as mp

    mp.spawn(_ring_worker, args=(3, free_port()), nprocs=3, join=True)


@pytest.mark.quick
def test_ring_chunks_balance_causal_work_over_ranks():
    """Under a causal mask every rank of a balanced ring attends over as many key positions
    (chunk pairs seen, a diagonal one counting half); contiguous slices load the last rank most."""
    from distft.parallel import ring

    def work(n: int, balanced: bool) -> list[float]:
        out = []
        for rank in range(n):
            meta = {"rank": rank, "n": n, "balanced": balanced, "h": 1, "packed": False, "window": None}
            pairs = [keep for src in range(n) for _, _, keep in ring._pairs(meta, src)]
            out.append(sum(0.5 if keep == "causal" else 1.0 for keep in pairs))
        return out

    for n in (2, 4, 8):
        assert len(set(work(n, True))) == 1, work(n, True)
        assert work(n, False) == [r + 0.5 for r in range(n)]
