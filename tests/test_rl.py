"""RL methods (PPO, GRPO/RLOO): advantage estimators against plain per-sequence references, the
graded default reward, reward failures that are isolated and counted, rollout log-probs equal to
the sampler's, and real 2-rank runs on zero2, fsdp and zero3 that learn, checkpoint, resume and
export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distft.config.load import load_config
from distft.errors import ConfigError, DataError, DistftError
from distft.methods.rl.advantages import gae, group_advantages, whiten
from distft.methods.rl.loop import FailureBudget
from distft.methods.rl.prompts import encode
from distft.methods.rl.rewards import RewardScorer, char_match
from distft.methods.rl.rollout import generate_rollouts, layout, token_logprobs
from tests.util import metrics, train


# ---------------------------------------------------------------------- helpers for tests
def flaky_reward(completions, prompts, **kw):
    """A user reward that raises on some rows and returns NaN on others (deterministic by prompt)."""
    out = []
    for p in prompts:
        if "z" in p:
            raise RuntimeError("boom")
        out.append(float("nan") if "q" in p else 0.0)
    return out


def always_raises(completions, **kw):
    raise RuntimeError("reward service unavailable")


def length_reward(completions, **kw):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------- advantages
def _naive_gae(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(values)
    for i in range(values.shape[0]):
        idx = mask[i].nonzero().flatten().tolist()
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[i, idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            running = delta + gamma * lam * running
            adv[i, t] = running
    return adv


@pytest.mark.quick
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_per_sequence_reference(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 10)
    for i, (a, b) in enumerate([(2, 7), (0, 10), (5, 6), (3, 9)]):  # prompt, action span, padding
        mask[i, a:b] = 1
    rewards = torch.randn(4, 10, generator=gen) * mask
    values = torch.randn(4, 10, generator=gen)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref = _naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref * mask)
    torch.testing.assert_close(ret, (ref + values) * mask)
    if gamma == 1.0 and lam == 1.0:  # Monte-Carlo: return = reward-to-go
        togo = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask
        torch.testing.assert_close(ret, togo)


@pytest.mark.quick
def test_whiten_uses_masked_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = whiten(x, mask, torch.device("cpu"))
    vals = w[mask.bool()]
    assert abs(float(vals.mean())) < 1e-6 and abs(float(vals.std()) - 1.0) < 1e-4
    assert float(w[~mask.bool()].abs().sum()) == 0.0


@pytest.mark.quick
def test_group_advantages_grpo_and_rloo():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    valid = torch.ones(8, dtype=torch.bool)
    grpo = group_advantages(scores, valid, 4, "grpo", scale=True)
    g = scores[:4]
    torch.testing.assert_close(grpo[:4], (g - g.mean()) / (g.std() + 1e-4))
    assert float(grpo[4:].abs().sum()) == 0.0  # equal rewards: no signal
    rloo = group_advantages(scores, valid, 4, "rloo")
    for i in range(4):
        others = torch.cat([g[:i], g[i + 1 :]])
        assert abs(float(rloo[i]) - float(g[i] - others.mean())) < 1e-6
    # An invalid reward takes no part in its group's baseline and gets no advantage.
    valid[0] = False
    rloo = group_advantages(scores, valid, 4, "rloo")
    assert float(rloo[0]) == 0.0
    assert abs(float(rloo[1]) - (0.0 - 0.5)) < 1e-6


# ---------------------------------------------------------------------- rewards
@pytest.mark.quick
def test_char_match_is_graded():
    r = char_match(
        ["abc", "abd", "cba", "", "abcx", "abc"],
        stopped=[True, True, True, True, True, False],
        completion=["abc"] * 6,
    )
    assert r[0] == pytest.approx(1.0)  # exact answer and EOS
    assert r[0] > r[1] > r[3] and r[2] > r[3]  # partial credit, ordered
    assert r[2] == pytest.approx(0.5 * 1 / 3 + 0.3 + 0.2)  # letters right, one in place
    assert r[4] < r[0] and r[5] == pytest.approx(0.8)  # extra characters; no EOS
    with pytest.raises(ValueError, match="reference column"):
        char_match(["a"], prompt=["x"])


def _scorer(funcs, **method):
    overrides = ["method=grpo", f"method.reward_funcs={funcs}"]
    overrides += [f"method.{k}={v}" for k, v in method.items()]
    cfg, _ = load_config(overrides)
    from distft.models.tiny import build_tokenizer

    return RewardScorer(cfg, build_tokenizer(), torch.device("cpu"))


@pytest.mark.quick
def test_reward_failures_are_isolated_counted_and_limited(capsys):
    scorer = _scorer(
        "[{_target_: distft.methods.rl.rewards.char_match, weight: 2.0},"
        " {_target_: tests.test_rl.flaky_reward, weight: 1.0}]"
    )
    prompts = ["sort abc=", "sort zab=", "sort qab=", "sort bca="]
    s = scorer(prompts, ["abc", "abz", "abq", "abc"], [[1]] * 4, [True] * 4, [{"completion": "abc"}] * 4)
    assert s.valid.tolist() == [True, False, False, True]
    assert s.failures == 2
    assert s.total.tolist() == pytest.approx([2.0, 0.0, 0.0, 2.0])  # weights apply
    assert "flaky_reward failed (RuntimeError: boom)" in capsys.readouterr().err
    budget = FailureBudget(limit=3)
    budget.add(scorer, s.failures, torch.device("cpu"))
    with pytest.raises(
        DistftError, match=r"reward failed on 4 rollouts .*max_reward_failures=3.*flaky_reward"
    ):
        budget.add(scorer, s.failures, torch.device("cpu"))


@pytest.mark.quick
def test_reward_config_errors():
    with pytest.raises(ConfigError, match="not an importable callable"):
        _scorer("[{_target_: distft.methods.rl.rewards.no_such_fn}]")
    with pytest.raises(ConfigError, match=r"reward_funcs\[0\].*_target_"):
        load_config(["method=ppo", "method.reward_funcs=[{weight: 1}]"])
    with pytest.raises(ConfigError, match="no reward"):
        load_config(["method=grpo", "method.reward_funcs=[]"])
    with pytest.raises(ConfigError, match="method.advantage='ppo'; valid: grpo, rloo"):
        load_config(["method=grpo", "method.advantage=ppo"])
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        load_config(["method=grpo", "method.num_generations=1"])
    with pytest.raises(ConfigError, match="reward_model=.*does not load"):
        _scorer("[]", reward_model="/nonexistent/dir")


@pytest.mark.quick
def test_reward_model_scores_are_added(tmp_path, tiny):
    from transformers import AutoModelForSequenceClassification

    model, tok = tiny
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(model.name_or_path, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = _scorer(
        "[{_target_: tests.test_rl.length_reward}]",
        reward_model=str(tmp_path / "rm"),
        reward_model_weight=0.5,
    )
    s = scorer(["sort ab=", "sort ba="], ["ab", "abc"], [[1], [1]], [True, True], [{}, {}])
    with torch.no_grad():
        enc = tok(["sort ab=ab", "sort ba=abc"], return_tensors="pt", padding=True)
        expected = rm(**enc).logits[:, 0].double()
    torch.testing.assert_close(s.per_func["reward_model"], expected)
    torch.testing.assert_close(s.total, torch.tensor([2.0, 3.0], dtype=torch.float64) + 0.5 * expected)


# ---------------------------------------------------------------------- data and rollouts
@pytest.mark.quick
def test_encode_prompts_messages_and_errors(tiny):
    _, tok = tiny
    cfg, _ = load_config(["method=grpo", "data.max_length=24", "method.max_new_tokens=8"])
    rows = [
        {"prompt": "sort cab=", "completion": "abc", "_source": "f:1"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "x" * 40, "_source": "f:3"},  # longer than max_length - max_new_tokens
        {"prompt": "no reference"},
    ]
    ex, stats = encode(rows, tok, cfg, train=True)
    assert [e["prompt"] for e in ex] == ["sort cab=", "<|user|>hi<|end|><|assistant|>", "no reference"]
    assert ex[0]["columns"] == {"prompt": "sort cab=", "completion": "abc"}
    assert stats["dropped_prompt_too_long"] == 1
    held_out, stats = encode(rows, tok, cfg, train=False)  # eval loss needs a reference answer
    assert len(held_out) == 2 and stats["no_reference"] == 1
    with pytest.raises(DataError, match=r"f:9: missing fields for RL prompts"):
        encode([{"question": "?", "_source": "f:9"}], tok, cfg, train=True)


@pytest.mark.quick
def test_rollout_logprobs_are_the_samplers(tiny):
    """The training forward (right-padded, no mask) gives the log-probs the sampler drew from
    (left-padded generation), so the PPO ratio starts at exactly 1 for the right reason."""
    model, tok = tiny
    cfg, _ = load_config(["method=ppo", "method.temperature=0.7", "method.max_new_tokens=6"])
    prompts = ["sort cab=", "reverse hello=", "x="]
    ids = [tok(p)["input_ids"] for p in prompts]
    torch.manual_seed(0)
    roll = generate_rollouts(model, tok, prompts, ids, cfg, torch.device("cpu"), synced=False)
    width = max(map(len, ids))
    x = torch.full((3, width), tok.pad_token_id)
    attn = torch.zeros_like(x)
    for i, p in enumerate(ids):
        x[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    torch.manual_seed(0)
    out = model.generate(
        input_ids=x,
        attention_mask=attn,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    steps = torch.stack(out.logits, 1).float() / 0.7
    sampled = out.sequences[:, width:]
    expected = torch.log_softmax(steps, -1).gather(2, sampled[..., None])[..., 0]
    lp = token_logprobs(model, roll.input_ids, 0.7)
    for i in range(3):
        n = len(roll.completion_ids[i])
        assert roll.completion_ids[i] == sampled[i, :n].tolist()
        torch.testing.assert_close(lp[i][roll.mask[i].bool()], expected[i, :n], atol=1e-4, rtol=1e-4)
        # The engine's own log-probs are kept (method.tis_cap, rollout/logprob_diff), laid out as mask.
        torch.testing.assert_close(roll.sample_logprobs[i][roll.mask[i].bool()], expected[i, :n])
        assert float(roll.sample_logprobs[i][~roll.mask[i].bool()].abs().sum()) == 0.0


@pytest.mark.quick
def test_layout_marks_completion_tokens_only(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    roll = layout(tok, ["ab", "c"], [[10, 11], [12]], [[20, eos], [21, 22, 23]], [True, False])
    assert roll.input_ids.tolist() == [[10, 11, 20, eos], [12, 21, 22, 23]]
    assert roll.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert roll.completions == [tok.decode([20]), tok.decode([21, 22, 23])]


# ---------------------------------------------------------------------- real runs (2 ranks)
# Each learning run: a short SFT warm start, then RL on the default task. The threshold (issue 4):
# mean reward of the last tenth of the steps at least 20% above the first tenth.
LEARN_STEPS = 60  # PPO; GRPO's steps are cheaper (no critic): it gets more
GRPO_STEPS = 80
WARMUP_STEPS = 100  # a partial warm start (greedy char-match reward about 0.45): room to improve
RL_FAST = [
    "train.progress=false",
    "train.lr_scheduler=constant",
    "train.warmup_steps=0",
    "data.max_eval_generations=64",
    "method.max_new_tokens=6",
    "method.num_prompts=1200",
]
# 64 rollouts per step over the 2 ranks; policy lr = train.lr (3e-3) × lr_scale.
PPO_LEARN = ["method=ppo", "train.micro_batch_size=32", "method.lr_scale=0.1", "method.kl_coef=0.01"]
GRPO_LEARN = ["method=grpo", "train.micro_batch_size=8", "method.num_generations=4", "method.lr_scale=0.2"]


def _rewards(run_dir) -> list[float]:
    return [r["reward"] for r in metrics(run_dir) if "reward" in r]


def _tenths(values: list[float]) -> tuple[float, float]:
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


@pytest.fixture(scope="module")
def ppo_zero2(tmp_path_factory):
    """The demo path: method=ppo with its SFT warm-up, ZeRO-2, 2 ranks; checkpoints mid-run."""
    run = tmp_path_factory.mktemp("rl") / "ppo_zero2"
    train(
        run,
        *RL_FAST,
        *PPO_LEARN,
        "strategy=zero2",
        f"method.sft_warmup_steps={WARMUP_STEPS}",
        f"train.max_steps={LEARN_STEPS}",
        f"train.save_every={LEARN_STEPS // 2}",
    )
    return run


@pytest.fixture(scope="module")
def warm(ppo_zero2):
    """The warm start the PPO demo wrote (Hugging Face format): other runs start from it."""
    return ppo_zero2 / "sft_warmup"


@pytest.mark.slow
def test_ppo_learns_on_zero2_and_logs_rl_metrics(ppo_zero2):
    rewards = _rewards(ppo_zero2)
    assert len(rewards) == LEARN_STEPS
    first, last = _tenths(rewards)
    print(f"PPO zero2 reward: first tenth {first:.3f} -> last tenth {last:.3f}")
    assert last >= 1.2 * first, (first, last)
    row = [r for r in metrics(ppo_zero2) if "reward" in r][-1]
    for key in (
        "loss",
        "reward",
        "kl",
        "value_loss",
        "clipfrac",
        "approx_kl",
        "critic_grad_norm",
        "completion_length",
        "reward_failures",
        "grad_norm",
        "lr",
    ):
        assert key in row and math.isfinite(row[key]), key
    assert rows_with(ppo_zero2, "reward")[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # π = π_ref at first
    evals = rows_with(ppo_zero2, "eval/reward")  # held-out prompts, before and after
    assert evals[0]["step"] == 0 and evals[-1]["step"] == LEARN_STEPS and "eval/reward_greedy" in evals[-1]
    assert evals[-1]["eval/reward"] > evals[0]["eval/reward"]  # sampled as in training, fixed seed


def rows_with(run_dir, key: str) -> list[dict]:
    return [r for r in metrics(run_dir) if key in r]


@pytest.mark.slow
def test_ppo_checkpoint_holds_critic_and_export_has_policy_and_critic(ppo_zero2):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    ckpt = ppo_zero2 / "checkpoints" / f"step_{LEARN_STEPS}"
    assert (ckpt / "critic").is_dir() and any((ckpt / "critic").rglob("*.pt"))
    state = json.loads((ckpt / "rl_state.json").read_text())
    assert state["start_policy"] == str(ppo_zero2 / "sft_warmup")
    export = ppo_zero2 / "export"
    tok = AutoTokenizer.from_pretrained(export)
    policy = AutoModelForCausalLM.from_pretrained(export)
    critic = AutoModelForTokenClassification.from_pretrained(export / "critic")
    assert critic.config.num_labels == 1
    ids = tok(["sort cab="], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        values = critic(input_ids=ids).logits
        out = policy.generate(ids, max_new_tokens=6, do_sample=False)
    assert values.shape == (1, ids.shape[1], 1) and float(values.abs().sum()) > 0  # trained head
    assert out.shape[1] > ids.shape[1]


@pytest.fixture(scope="module")
def grpo_fsdp(tmp_path_factory, warm):
    run = tmp_path_factory.mktemp("rl") / "grpo_fsdp"
    train(
        run,
        *RL_FAST,
        *GRPO_LEARN,
        "strategy=fsdp",
        f"model.name_or_path={warm}",
        "method.sft_warmup_steps=0",
        f"train.max_steps={GRPO_STEPS}",
    )
    return run


@pytest.mark.slow
def test_grpo_learns_on_fsdp_and_exports(grpo_fsdp):
    from transformers import AutoModelForCausalLM

    rewards = _rewards(grpo_fsdp)
    first, last = _tenths(rewards)
    print(f"GRPO fsdp reward: first tenth {first:.3f} -> last tenth {last:.3f}")
    assert last >= 1.2 * first, (first, last)
    rows = rows_with(grpo_fsdp, "kl_k3")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollouts: π = π_ref
    assert rows[-1]["kl"] > 0 and rows[-1]["kl_k3"] > 0  # then the policy moved away from it
    evals = rows_with(grpo_fsdp, "eval/reward")
    assert evals[-1]["eval/reward"] > evals[0]["eval/reward"]
    assert AutoModelForCausalLM.from_pretrained(grpo_fsdp / "export").config.model_type == "llama"


# Short runs: a user reward that fails on some rows (isolated, counted, logged, training goes on).
FLAKY = (
    "method.reward_funcs=[{_target_: distft.methods.rl.rewards.char_match},"
    " {_target_: tests.test_rl.flaky_reward, weight: 0.5}]"
)
SHORT = [*RL_FAST, "method.sft_warmup_steps=0", "train.micro_batch_size=8", "method.max_reward_failures=1000"]


@pytest.fixture(scope="module")
def ppo_fsdp(tmp_path_factory, warm):
    """PPO on FSDP2, 4 steps with checkpoints at 2 and 4, then a resume from step 2 elsewhere."""
    root = tmp_path_factory.mktemp("rl")
    common = [*SHORT, "method=ppo", "strategy=fsdp", f"model.name_or_path={warm}", FLAKY, "train.max_steps=4"]
    train(root / "full", *common, "train.save_every=2")
    train(root / "resumed", *common, f"resume={root / 'full' / 'checkpoints' / 'step_2'}")
    return root


@pytest.mark.slow
def test_ppo_fsdp_resume_restores_policy_critic_and_sampling(ppo_fsdp):
    full = {r["step"]: r for r in rows_with(ppo_fsdp / "full", "reward")}
    resumed = {r["step"]: r for r in rows_with(ppo_fsdp / "resumed", "reward")}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("reward", "kl", "value_loss", "loss", "completion_length"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert (ppo_fsdp / "full" / "checkpoints" / "step_2" / "critic").is_dir()


@pytest.mark.slow
def test_failing_reward_rows_are_skipped_counted_and_logged(ppo_fsdp):
    rows = rows_with(ppo_fsdp / "full", "reward_failures")
    assert sum(r["reward_failures"] for r in rows) > 0  # 'z' or 'q' in some prompts of every step
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["loss"]) for r in rows)
    assert all("rewards/flaky_reward" in r for r in rows)


@pytest.fixture(scope="module")
def grpo_zero2(tmp_path_factory, warm):
    run = tmp_path_factory.mktemp("rl") / "grpo_zero2"
    proc = train(
        run,
        *SHORT,
        "method=grpo",
        "strategy=zero2",
        f"model.name_or_path={warm}",
        FLAKY,
        "train.max_steps=2",
        "method.epochs=2",
    )
    return run, proc


@pytest.mark.slow
def test_grpo_zero2_runs_with_failing_rewards_and_warns_once(grpo_zero2):
    run, proc = grpo_zero2
    rows = rows_with(run, "reward")
    assert len(rows) == 2 and sum(r["reward_failures"] for r in rows) > 0
    out = proc.stdout + proc.stderr
    assert out.count("reward function flaky_reward failed (RuntimeError: boom)") <= 2  # once per rank
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_zero3_and_ddp_generation_match_fsdp(tmp_path, ppo_fsdp, grpo_fsdp, warm):
    """Under ZeRO-3 every rank gathers the sharded weights for each generation step (synced
    ranks): the first steps' rollouts, from the same start policy and seed, match FSDP2's; so do
    DDP's (PPO on its plain replicas)."""
    ref = rows_with(ppo_fsdp / "full", "reward")
    for strategy, steps in (("zero3", 2), ("ddp", 1)):
        ppo = tmp_path / f"ppo_{strategy}"
        train(
            ppo,
            *SHORT,
            "method=ppo",
            f"strategy={strategy}",
            f"model.name_or_path={warm}",
            FLAKY,
            f"train.max_steps={steps}",
        )
        mine_rows = rows_with(ppo, "reward")
        assert len(mine_rows) == steps and all("value_loss" in r for r in mine_rows)
        for mine, theirs in zip(mine_rows, ref[:steps]):
            assert mine["reward"] == pytest.approx(theirs["reward"], abs=1e-6), strategy
            assert mine["completion_length"] == pytest.approx(theirs["completion_length"], abs=1e-6)
    grpo = tmp_path / "grpo_zero3"
    train(
        grpo,
        *RL_FAST,
        *GRPO_LEARN,
        "strategy=zero3",
        f"model.name_or_path={warm}",
        "method.sft_warmup_steps=0",
        "train.max_steps=1",
        "method.advantage=rloo",
    )
    first = rows_with(grpo, "reward")[0]
    assert first["reward"] == pytest.approx(rows_with(grpo_fsdp, "reward")[0]["reward"], abs=1e-6)
    assert math.isfinite(first["loss"]) and first["advantage_abs"] > 0


@pytest.mark.slow
def test_reward_failures_over_the_limit_stop_with_a_clear_error(tmp_path):
    proc = train(
        tmp_path / "run",
        *SHORT,
        "method=grpo",
        "method.max_reward_failures=3",
        "train.max_steps=2",
        "method.reward_funcs=[{_target_: tests.test_rl.always_raises}]",
        "train.eval_generate=false",
        plain=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distft: error: reward failed on" in proc.stderr and "max_reward_failures=3" in proc.stderr
    assert "failing: always_raises" in proc.stderr and "Traceback" not in proc.stderr
