"""GRPO's loss family (method.loss_type): each variant on fixed tensors against its paper's formula
(written per sequence, plainly) and against TRL 1.16's GRPOTrainer._compute_loss (called on the
same tensors), value and gradient within 1e-6; the normalizer split over micro-batches; DAPO's
overlong shaping and dynamic-sampling selection; and 2 real gloo ranks where every variant
trains and the RL update is the same under grad-accum 2 on 1 rank and world size 2."""

from __future__ import annotations

import collections
import json
import math
import os
import types
from pathlib import Path

import pytest
import torch

from distft.config.load import load_config
from distft.errors import ConfigError
from distft.methods.rl.losses import LOSSES, PolicyTerms, epsilons, normalizer, policy_loss
from distft.methods.rl.rewards import Scores
from distft.methods.rl.sampling import informative_groups, shape_overlong
from tests.util import FAST, free_port

VARIANTS = ("grpo", "bnpo", "dapo", "dr_grpo", "gspo", "cispo")
B, T, MAX_LEN = 6, 7, 7
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _tensors():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3, 5, 1, 6, 4]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # clips on both sides
    ref = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9, -0.2], dtype=torch.float64)
    return logp, old, ref, adv, mask


def _ours(kind, logp, old, ref, adv, mask, beta, rows=slice(None), is_w=None):
    t = PolicyTerms(
        logp=logp[rows],
        old_logp=old[rows],
        adv=adv[rows, None],
        mask=mask[rows],
        eps_low=EPS_LOW if kind != "cispo" else 1.0,
        eps_high=EPS_HIGH if kind != "cispo" else 4.0,
        max_len=MAX_LEN,
        ref_logp=ref[rows],
        beta=beta,
        is_weights=None if is_w is None else is_w[rows],
    )
    loss, _ = policy_loss(kind, t)
    return loss, normalizer(kind, mask[rows], MAX_LEN)


def _paper(kind, logp, old, ref, adv, mask, beta):
    """The papers' objectives, negated, one sequence and one token at a time."""
    seqs, tokens = [], []
    for i in range(B):
        n = int(mask[i].sum())
        a = float(adv[i])
        r = [torch.exp(logp[i, t] - old[i, t]) for t in range(n)]
        kl = [torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1 for t in range(n)]
        if kind == "gspo":  # s_i = (π/π_old)^(1/|y_i|), clipped per sequence
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n)) / n)
            term = -torch.min(s * a, torch.clamp(s, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
            seqs.append(term + beta * sum(kl) / n)
            continue
        if kind == "cispo":  # sg(clip(r, 1 − ε_low, 1 + ε_high)) · A · log π, no lower bound
            per = [-torch.clamp(r[t], 0.0, 5.0).detach() * a * logp[i, t] + beta * kl[t] for t in range(n)]
        else:
            per = [
                -torch.min(r[t] * a, torch.clamp(r[t], 1 - EPS_LOW, 1 + EPS_HIGH) * a) + beta * kl[t]
                for t in range(n)
            ]
        seqs.append(sum(per) / n)
        tokens.extend(per)
    if kind in ("grpo", "gspo"):  # DeepSeekMath eq. 3; GSPO eq. 5: mean over the group
        return sum(seqs) / B
    if kind == "dr_grpo":  # Dr. GRPO: no 1/|o_i|; a constant (max length) per sequence
        return sum(tokens) / (B * MAX_LEN)
    return sum(tokens) / mask.sum()  # DAPO eq. 8, CISPO eq. 4: over all tokens of the batch


def _trl(kind, logp, old, ref, adv, mask, beta, is_ratio=None):
    """TRL 1.16's GRPOTrainer._compute_loss on the same tensors (one process, no accumulation);
    `is_ratio`: its vLLM importance-sampling correction (token_truncate weights)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trl_kind = {"gspo": "grpo"}.get(kind, kind)
    acc = types.SimpleNamespace(
        num_processes=1, gather=lambda x: x.reshape(-1), reduce=lambda x, reduction: x, sync_gradients=True
    )
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="sequence" if kind == "gspo" else "token",
        beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=trl_kind,
        epsilon_low=EPS_LOW,
        epsilon_high=5.0 if kind == "cispo" else EPS_HIGH,  # TRL's cispo ε_max: the weight's cap
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=True,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN,
        accelerator=acc,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
        "importance_sampling_ratio": is_ratio,
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def _value_and_grad(fn, logp, *args):
    logp.grad = None
    loss = fn(logp, *args)
    (grad,) = torch.autograd.grad(loss, logp)
    return float(loss), grad


@pytest.mark.quick
@pytest.mark.parametrize("kind", VARIANTS)
def test_each_variant_equals_its_paper_and_trl(kind):
    logp, old, ref, adv, mask = _tensors()

    def ours(lp, beta):
        loss, norm = _ours(kind, lp, old, ref, adv, mask, beta)
        return loss / norm

    for beta in (0.0, BETA):
        mine, g_mine = _value_and_grad(ours, logp, beta)
        if kind != "bnpo":  # TRL's bnpo divides by the local batch's tokens: the same here (one batch)
            paper_fn = lambda lp, b: _paper(kind, lp, old, ref, adv, mask, b)  # noqa: E731
            paper, g_paper = _value_and_grad(paper_fn, logp, beta)
            assert abs(mine - paper) < 1e-6, (kind, beta, mine, paper)
            torch.testing.assert_close(g_mine, g_paper, atol=1e-6, rtol=0)
        trl, g_trl = _value_and_grad(lambda lp, b: _trl(kind, lp, old, ref, adv, mask, b), logp, beta)
        assert abs(mine - trl) < 1e-6, (kind, beta, mine, trl)
        torch.testing.assert_close(g_mine, g_trl, atol=1e-6, rtol=0)
    # Split over micro-batches / ranks: the summed parts over the summed normalizers is the same loss.
    parts = [_ours(kind, logp, old, ref, adv, mask, BETA, slice(a, a + 2)) for a in range(0, B, 2)]
    whole, norm = _ours(kind, logp, old, ref, adv, mask, BETA)
    split = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert abs(float(split) - float(whole / norm)) < 1e-12


@pytest.mark.quick
def test_truncated_importance_sampling_weights_the_loss_as_trl():
    """method.tis_cap: min(π_old/π_sampler, cap) multiplies each token's policy term, as TRL's
    vLLM correction (token_truncate) does; the log-prob difference is summed for the metric."""
    from distft.methods.rl.engines import tis_weights

    logp, old, ref, adv, mask = _tensors()
    g = torch.Generator().manual_seed(1)
    sample = old - torch.rand(B, T, generator=g, dtype=torch.float64) * 2  # the sampler differs
    w, diff, count = tis_weights(old, sample, mask, 2.0)
    assert float(w.max()) == 2.0 and float(w.min()) >= 1.0 and not w.requires_grad
    assert abs(float(diff) - float(((old - sample).abs() * mask).sum())) < 1e-12 and count == mask.sum()
    assert tis_weights(old, sample, mask, None)[0] is None
    for kind in VARIANTS:
        loss, norm = _ours(kind, logp, old, ref, adv, mask, BETA, is_w=w)
        mine, g_mine = float(loss / norm), torch.autograd.grad(loss / norm, logp)[0]
        trl, g_trl = _value_and_grad(lambda lp, b, k=kind: _trl(k, lp, old, ref, adv, mask, b, w), logp, BETA)
        assert abs(mine - trl) < 1e-6, (kind, mine, trl)
        torch.testing.assert_close(g_mine, g_trl, atol=1e-6, rtol=0)
        plain, _ = _ours(kind, logp.detach(), old, ref, adv, mask, BETA)
        assert abs(float(plain / norm) - mine) > 1e-3, kind  # the weights changed the loss


@pytest.mark.quick
def test_variants_differ_and_defaults_and_validation():
    """The variants are different losses on the same tensors (the report's figures), the loss
    types' clip defaults, and config errors in one line."""
    logp, old, ref, adv, mask = _tensors()
    values = {}
    for kind in VARIANTS:
        loss, norm = _ours(kind, logp.detach(), old, ref, adv, mask, 0.0)
        values[kind] = float(loss / norm)
    print("loss on the fixed tensors:", json.dumps({k: round(v, 6) for k, v in values.items()}))
    assert len({round(v, 9) for k, v in values.items() if k != "bnpo"}) == len(VARIANTS) - 1
    assert set(LOSSES) == set(VARIANTS)
    cfg, _ = load_config(["method=grpo", "method.loss_type=dapo"])
    assert epsilons(cfg.method) == (0.2, 0.28)
    cfg, _ = load_config(["method=grpo", "method.loss_type=cispo", "method.epsilon_high=2.0"])
    assert epsilons(cfg.method) == (1.0, 2.0)
    with pytest.raises(ConfigError, match="method.loss_type='ppo'; valid: grpo, bnpo, dapo"):
        load_config(["method=grpo", "method.loss_type=ppo"])
    with pytest.raises(ConfigError, match=r"method.epsilon_low=1.5 must be in \(0, 1\]"):
        load_config(["method=grpo", "method.epsilon_low=1.5"])
    with pytest.raises(ConfigError, match="overlong_buffer=9 exceeds method.max_new_tokens=8"):
        load_config(["method=grpo", "method.overlong_buffer=9"])
    for method in ("grpo", "ppo"):
        with pytest.raises(ConfigError, match="engine=vllm runs only on GPUs .*use method.rollout.engine=hf"):
            load_config([f"method={method}", "method.rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="method.rollout.engine='sglang'; valid: hf, vllm"):
        load_config(["method=grpo", "method.rollout.engine=sglang"])
    with pytest.raises(ConfigError, match="method.tis_cap=0.5 must be >= 1"):
        load_config(["method=grpo", "method.tis_cap=0.5"])


@pytest.mark.quick
def test_overlong_shaping_and_informative_groups():
    from trl.rewards import get_soft_overlong_punishment

    m = types.SimpleNamespace(overlong_buffer=4, max_new_tokens=8, overlong_penalty=0.5)
    ids = [[1] * n for n in (2, 4, 5, 7, 8, 8)]
    s = Scores(torch.ones(6, dtype=torch.float64), torch.tensor([True] * 5 + [False]))
    shape_overlong(s, ids, m)
    want = [0.5 * p for p in get_soft_overlong_punishment(8, 4)(ids)]
    assert want == [0.0, 0.0, -0.125, -0.375, -0.5, -0.5]  # DAPO eq. 13, scaled
    assert s.per_func["overlong"].tolist() == want
    assert s.total.tolist() == [1.0, 1.0, 0.875, 0.625, 0.5, 1.0]  # an invalid reward is left alone
    # Groups of 3: all equal | differ | equal among the valid ones | one valid only.
    total = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 5.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    valid = torch.tensor([True] * 8 + [False, True, False, False])
    assert informative_groups(Scores(total, valid), 3).tolist() == [False, True, False, False]


# ---------------------------------------------------------------------- real ranks
STEPS = 1
RUN = [
    *FAST,
    "method=grpo",
    "strategy=ddp",
    "method.sft_warmup_steps=0",
    "method.num_prompts=200",
    "method.max_new_tokens=4",
    "method.num_generations=4",
    "method.mini_batches=2",
    "method.epochs=2",
    "method.lr_scale=1.0",
    "method.beta=0.04",
    "train.micro_batch_size=2",
    "train.lr_scheduler=constant",
    "train.warmup_steps=0",
    f"train.max_steps={STEPS}",
    "train.eval_generate=false",
    "data.max_eval_generations=0",
    "train.export=none",
    "eval.test=false",
    "cluster.preflight=false",
]
# Per variant: extra options. dapo runs the whole recipe (dynamic sampling, overlong shaping).
RUNS = {
    "grpo": {},
    "bnpo": {},
    "dapo": {"dynamic_sampling": True, "overlong_buffer": 2, "mask_truncated": True},
    "dr_grpo": {"scale_rewards": False},
    "gspo": {},
    "cispo": {},
}


def _fixed_batch(tokenizer, world: int, rank: int):
    """The same 16 scored rollouts (4 groups) on any world size: this rank's contiguous share."""
    from distft.methods.rl.loop import Batch
    from distft.methods.rl.rollout import layout

    g = torch.Generator().manual_seed(3)
    prompts = [f"sort {w}=" for w in ("cab", "dcba", "ba", "edcb")]
    rows = [(p, tokenizer(p)["input_ids"]) for p in prompts for _ in range(4)]
    lengths = torch.randint(1, 5, (len(rows),), generator=g).tolist()
    comp = [torch.randint(5, 20, (n,), generator=g).tolist() for n in lengths]
    stopped = [bool(i % 3) for i in range(len(rows))]
    comp = [c + [tokenizer.eos_token_id] if s else c for c, s in zip(comp, stopped)]
    share = len(rows) // world
    mine = slice(rank * share, (rank + 1) * share)
    texts, ids = [p for p, _ in rows][mine], [i for _, i in rows][mine]
    roll = layout(tokenizer, texts, ids, comp[mine], stopped[mine])
    total = torch.rand(len(rows), generator=g, dtype=torch.float64)[mine]
    return Batch(roll, Scores(total, torch.ones(share, dtype=torch.bool)), share // 2)


def _worker(rank: int, world: int, port: int, root: str, accum: int) -> None:
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import dataclasses

    from distft.config.load import load_config
    from distft.engine.trainer import Trainer

    cfg, composed = load_config([*RUN, f"train.grad_accum={accum}", f"output_dir={Path(root) / str(world)}"])
    trainer = Trainer.build(cfg, composed)  # one policy for all variants: the method's config switches
    method, ctx = trainer.method, trainer.ctx
    base = dataclasses.replace(cfg.method)
    out: dict = {"update": {}, "steps": {}}
    # The update on fixed rollouts, each variant in turn on the same policy: 2 ranks × accum 1 vs
    # 1 rank × accum 2 over the same global batch must give the same losses and weights.
    for kind in VARIANTS:
        cfg.method.loss_type = kind
        r = method.update(ctx, 0, _fixed_batch(trainer.tokenizer, world, rank))
        sd = trainer.strategy.full_state_dict()
        out["update"][kind] = {
            "loss": r.loss,
            "kl": r.metrics["kl"],
            "fingerprint": float(sum((v.double() ** 2).sum() for v in sd.values())),
        }
    if world == 2:  # then every variant trains on real rollouts for a step or two
        for kind in VARIANTS:
            cfg.method = dataclasses.replace(base, loss_type=kind, **RUNS[kind])
            method.cfg = cfg
            params = list(trainer.strategy.model.parameters())
            before = [p.detach().clone() for p in params]
            results = [method.train_step(ctx, step) for step in range(STEPS)]
            rows = [r.metrics | {"loss": r.loss} for r in results]
            moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(params, before))
            out["steps"][kind] = {"moved": moved, "rows": rows}
        # The rollout engine's log-probs against the trainer's, corrected by truncated IS.
        cfg.method = dataclasses.replace(base, tis_cap=2.0, epochs=1, mini_batches=1)
        method.cfg = cfg
        out["steps"]["tis"] = method.train_step(ctx, 0).metrics
    if rank == 0:
        (Path(root) / f"world{world}.json").write_text(json.dumps(out))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("losses")
    mp.spawn(_worker, args=(2, free_port(), str(root), 1), nprocs=2, join=True)
    mp.spawn(_worker, args=(1, free_port(), str(root), 2), nprocs=1, join=True)
    return root


@pytest.mark.slow
def test_every_variant_trains_on_two_ranks(ranks):
    steps = json.loads((ranks / "world2.json").read_text())["steps"]
    for kind in VARIANTS:
        assert steps[kind]["moved"] > 0, f"{kind}: the weights did not change"
        for row in steps[kind]["rows"]:
            for key in ("loss", "reward", "clipfrac", "kl", "kl_k3", "advantage_abs"):
                assert math.isfinite(row[key]), (kind, key)
    dapo = steps["dapo"]["rows"]
    assert all("dynamic_sampling/dropped_groups" in r and "rewards/overlong" in r for r in dapo)
    # hf engine: the sampler's log-probs are the trainer's up to kernel differences (KV cache)
    assert 0 <= steps["tis"]["rollout/logprob_diff"] < 1e-3
    assert all(0 <= r["rollout/logprob_diff"] < 1e-3 for r in steps["grpo"]["rows"])


@pytest.mark.slow
def test_rl_update_is_the_same_under_grad_accum_and_world_size(ranks):
    two = json.loads((ranks / "world2.json").read_text())["update"]
    one = json.loads((ranks / "world1.json").read_text())["update"]
    for kind in VARIANTS:
        for key in ("loss", "kl", "fingerprint"):
            a, b = two[kind][key], one[kind][key]
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-6), (kind, key, a, b)
    assert len({round(v["loss"], 7) for v in two.values()}) >= 5  # the variants are different updates
