"""RL methods (PPO, GRPO/RLOO), in process: advantage estimators against plain per-sequence
references, the graded default reward, reward failures that are isolated and counted, and rollout
log-probs equal to the sampler's. The real 2-rank runs are in tests/test_rl_runs.py."""

from __future__ import annotations

import pytest
import torch

from distft.config.load import load_config
from distft.errors import ConfigError, DataError, DistftError
from distft.methods.rl.advantages import gae, group_advantages, whiten
from distft.methods.rl.loop import FailureBudget
from distft.methods.rl.prompts import encode
from distft.methods.rl.rewards import RewardScorer, char_match
from distft.methods.rl.rollout import generate_rollouts, layout, token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


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
        " {_target_: tests.rl_util.flaky_reward, weight: 1.0}]"
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
        "[{_target_: tests.rl_util.length_reward}]",
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
