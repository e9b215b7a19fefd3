"""Multi-turn environments and reward servers: episodes whose observation tokens are masked out
of the loss, tool calls parsed through the chat template, an HTTP reward server (batches,
timeouts, retries, the failure budget) against a real local server, and the calculator demo that
learns to call its tool (extended tier; CI runs its path for 2 steps on 2 ranks)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from distft.config.load import load_config
from distft.errors import ConfigError, DistftError
from distft.methods.rl.env import Environment, EnvStep, Renderer, run_episodes
from distft.methods.rl.env_calc import CalculatorEnv, calc
from distft.methods.rl.loop import FailureBudget
from distft.methods.rl.rewards import RewardScorer
from tests.util import metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")


class EchoEnv(Environment):
    """Scripted: each turn gets the observation 'ok' (text) and reward 0.25, for two turns."""

    def __init__(self):
        self.turns = 0

    def step(self, completion, message):
        self.turns += 1
        return EnvStep("ok", 0.25, self.turns == 2)


ENV_CFG = [
    "method=grpo",
    "method.env={_target_: tests.test_rl_env.EchoEnv}",
    "method.max_turns=3",
    "method.max_new_tokens=5",
    "method.reward_funcs=[]",
]


@pytest.mark.quick
def test_episode_masks_observations_and_sums_rewards(tiny):
    model, tok = tiny
    cfg, _ = load_config(ENV_CFG)
    rows = [{"prompt": "sort cab="}, {"prompt": "x="}]
    torch.manual_seed(0)
    ep = run_episodes(model, tok, rows, cfg, torch.device("cpu"), synced=False)
    roll = ep.rollouts
    assert ep.rewards.tolist() == [0.5, 0.5]  # two turns of 0.25: the env said done after the second
    ok = tok("ok", add_special_tokens=False)["input_ids"]
    for i, row in enumerate(rows):
        p = tok(row["prompt"])["input_ids"]
        seq = roll.input_ids[i].tolist()
        comp = roll.completion_ids[i]
        assert seq[: len(p) + len(comp)] == p + comp
        # completion = turn 1 + "ok" + turn 2; the mask is 1 on the turns' tokens only
        acts = roll.mask[i, len(p) - 1 : len(p) - 1 + len(comp)].tolist()
        n_obs = len(comp) - int(sum(acts))
        assert n_obs == len(ok)  # one observation between the two turns
        start = acts.index(0.0)
        assert comp[start : start + len(ok)] == ok and acts[start : start + len(ok)] == [0.0] * len(ok)
        assert roll.mask[i, len(p) - 1 + len(comp) :].sum() == 0  # padding
    assert ep.stats["env/turns"] == (4.0, 2)


@pytest.mark.quick
def test_tool_calls_parse_through_the_chat_template_and_results_are_tool_turns(tiny):
    _, tok = tiny
    render = Renderer(tok, [calc])
    env = CalculatorEnv()
    row = {"prompt": "37*45", "answer": "1665"}
    prompt, ids = render.prompt(env.reset(row))
    assert prompt == "<|user|>37*45<|end|><|assistant|>" and tok.decode(ids) == prompt
    call = tok("[calc:37*45]", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    message = render.parse(call, prompt)
    assert message["tool_calls"][0]["function"] == {"name": "calc", "arguments": {"expression": "37*45"}}
    out = env.step("[calc:37*45]", message)
    assert not out.done and out.observation == [{"role": "tool", "name": "calc", "content": "1665"}]
    assert tok.decode(render.observation(out.observation)) == "<|tool|>1665<|end|><|assistant|>"
    bad = env.step("", render.parse(tok("[calc:import os]", add_special_tokens=False)["input_ids"], prompt))
    assert bad.observation[0]["content"].startswith("error: not an arithmetic expression")
    answer = render.parse(tok("1665", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], prompt)
    final = env.step("1665", answer)
    assert final.done and final.reward == pytest.approx(1.0)
    assert env.tool_calls == 2 and env.tool_failures == 1
    with pytest.raises(ConfigError, match=r"method.env works with method=grpo"):
        load_config(["method=ppo", "method.env={_target_: tests.test_rl_env.EchoEnv}"])
    with pytest.raises(ConfigError, match=r"method.env._target_='no.such.Env' does not instantiate"):
        load_config(["method=grpo", "method.env={_target_: no.such.Env}"])


# ---------------------------------------------------------------------- reward server
class Judge(BaseHTTPRequestHandler):
    """A reward server: reward = 1 if the completion equals the 'answer' column. The first request
    of a 'flaky' server fails with 503; a 'slow' one never answers in time."""

    mode = "ok"
    requests: list[int] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests.append(len(body["completions"]))
        if Judge.mode == "slow":
            time.sleep(1.0)
        if Judge.mode == "flaky" and len(Judge.requests) == 1:
            self.send_response(503)
            self.end_headers()
            return
        rewards = [float(c == a) for c, a in zip(body["completions"], body["answer"])]
        data = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client timed out (the slow server)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()


@pytest.mark.quick
def test_http_reward_server_batches_retries_and_counts_failures(judge_url, tiny, capsys):
    _, tok = tiny
    spec = (
        f"[{{_target_: distft.methods.rl.rewards.http_reward, url: '{judge_url}', batch_size: 4,"
        " timeout: 0.3, retries: 1, backoff: 0.01, weight: 2.0}]"
    )
    cfg, _ = load_config(["method=grpo", f"method.reward_funcs={spec}"])
    scorer = RewardScorer(cfg, tok, torch.device("cpu"))
    completions = ["ab", "x", "ab", "ab", "y", "ab", "ab", "z", "ab", "ab"]
    rows = [{"answer": "ab"}] * 10

    def score():
        return scorer(["p"] * 10, completions, [[1]] * 10, [True] * 10, rows)

    Judge.mode, Judge.requests = "ok", []
    s = score()
    assert sorted(Judge.requests) == [2, 4, 4]  # batches of batch_size
    assert s.total.tolist() == [2.0 * (c == "ab") for c in completions] and s.failures == 0
    Judge.mode, Judge.requests = "flaky", []
    s = score()
    assert len(Judge.requests) == 4 and s.failures == 0  # the 503 was retried
    Judge.mode, Judge.requests = "slow", []
    s = score()
    assert len(Judge.requests) == 6  # 3 batches × (1 try + 1 retry), each timing out
    assert s.failures == 10 and not s.valid.any() and float(s.total.abs().sum()) == 0
    assert "reward function http_reward failed" in capsys.readouterr().err
    budget = FailureBudget(limit=15)
    with pytest.raises(DistftError, match=r"reward failed on 20 rollouts .*failing: http_reward"):
        budget.add(scorer, s.failures, torch.device("cpu"))
        budget.add(scorer, s.failures, torch.device("cpu"))


# ---------------------------------------------------------------------- the calculator demo
CALC = [
    "method=grpo",
    "method.env={_target_: distft.methods.rl.env_calc.CalculatorEnv}",
    "method.max_turns=3",
    "method.reward_funcs=[]",
    "method.max_new_tokens=14",
    "train.micro_batch_size=8",
    "method.lr_scale=0.2",
    "train.lr_scheduler=constant",
    "train.warmup_steps=0",
    "data.max_eval_generations=16",
]
CALC_STEPS = 8
CALC_RUN = ["method.sft_warmup_steps=150", f"train.max_steps={CALC_STEPS}", "train.eval_generate=false"]


def _check_learned(rows: list[dict], name: str) -> None:
    """The demo's thresholds: the last three steps' tool-call rate at least 0.25 above the first
    step's, their mean reward at least 10% above it."""
    calls = [r["env/tool_calls"] for r in rows]
    rewards = [r["reward"] for r in rows]
    last_calls, last_reward = sum(calls[-3:]) / 3, sum(rewards[-3:]) / 3
    print(f"{name}: tool calls {calls[0]:.3f} -> {last_calls:.3f}, ", end="")
    print(f"reward {rewards[0]:.3f} -> {last_reward:.3f}")
    assert last_calls >= calls[0] + 0.25, calls
    assert last_reward >= 1.1 * rewards[0], rewards


@pytest.mark.slow
@pytest.mark.extended
def test_calculator_policy_learns_to_call_its_tool(tmp_path):
    """One process: the SFT warm-up on the environment's demonstrations (half call the tool, half
    answer at once), then GRPO over 3-turn episodes. Thresholds: the tool-call rate of the last
    three steps is at least 0.25 above the first step's, and their mean reward 10% above it."""
    run = tmp_path / "calc"
    train(run, *CALC, *CALC_RUN, plain=True)
    rows = [r for r in metrics(run) if "reward" in r]
    assert len(rows) == CALC_STEPS
    _check_learned(rows, "calculator env")
    assert all(r["rewards/env"] == pytest.approx(r["reward"]) for r in rows)  # the env's reward only
    assert all(r["env/turns"] <= 3 and r["env/tool_failures"] >= 0 for r in rows)


# ---------------------------------------------------------------------- asynchronous rollouts
# method.async_steps=0 is the synchronous loop exactly: these are the losses of this config before
# environments and asynchronous rollouts existed (commit 08acde8), bit for bit.
SYNC = [
    "method=grpo",
    "method.sft_warmup_steps=5",
    "train.max_steps=3",
    "train.micro_batch_size=4",
    "method.mini_batches=2",
    "train.eval_generate=false",
    "method.max_new_tokens=6",
]
SYNC_LOSSES = [0.08509125788724446, 0.1930733439084646, 0.2945561193757587]


@pytest.mark.slow
def test_async_steps_0_is_the_synchronous_loop_bit_for_bit(tmp_path):
    train(tmp_path / "sync", *SYNC, "method.async_steps=0", plain=True)
    rows = [r for r in metrics(tmp_path / "sync") if "loss" in r]
    assert [r["loss"] for r in rows] == SYNC_LOSSES
    assert all("staleness" not in r for r in rows)


@pytest.mark.slow
@pytest.mark.extended
def test_async_rollouts_learn_with_bounded_staleness(tmp_path):
    """The calculator demo with method.async_steps=1: the next step's episodes are generated while
    this step trains; staleness is 0 on the first step and 1 after; the policy still learns."""
    run = tmp_path / "async"
    train(run, *CALC, *CALC_RUN, "method.async_steps=1", plain=True)
    rows = [r for r in metrics(run) if "reward" in r]
    assert [r["staleness"] for r in rows] == [0.0] + [1.0] * (CALC_STEPS - 1)
    _check_learned(rows, "calculator env, async_steps=1")


@pytest.mark.slow
def test_calculator_episodes_with_async_rollouts_run_on_two_ranks(tmp_path):
    """CI's run of the demo's path: the calculator environment (tool calls, 3-turn episodes) with
    method.async_steps=1 on 2 real ranks, 2 steps after a short warm-up: staleness 0 then 1, the
    environment's reward is the reward, and its metrics are logged."""
    run = tmp_path / "calc"
    train(run, *CALC, "method.sft_warmup_steps=4", "train.max_steps=2", "train.eval_generate=false",
          "method.async_steps=1", "method.num_prompts=64")  # fmt: skip
    rows = [r for r in metrics(run) if "reward" in r]
    assert [r["staleness"] for r in rows] == [0.0, 1.0]
    for r in rows:
        assert r["rewards/env"] == pytest.approx(r["reward"]) and 1 <= r["env/turns"] <= 3
        assert 0 <= r["env/tool_calls"] <= 1 and r["env/tool_failures"] >= 0 and math.isfinite(r["loss"])
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.quick
def test_async_steps_need_grpo():
    with pytest.raises(ConfigError, match=r"method.async_steps=1 works with method=grpo"):
        load_config(["method=ppo", "method.async_steps=1"])
