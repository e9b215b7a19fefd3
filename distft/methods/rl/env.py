"""Multi-turn environments (`method.env`): episodes of several policy turns with observations
(tool results, feedback) between them.

An environment is a class named by `method.env._target_` (Hydra-instantiable; the other keys are
its keyword arguments); one instance runs one episode:

  reset(row)                   -> the first observation: the prompt, as text or chat messages
  step(completion, message)    -> EnvStep(observation, reward, done)

`completion` is the turn's text; `message` is that text parsed through the chat template's
response template (`tokenizer.parse_response`: `content`, `tool_calls`). An observation is text
or chat messages (e.g. `{"role": "tool", ...}`), rendered by the chat template and appended as
tokens that are masked out of the loss: the policy is trained on the tokens it generated only.
The episode ends when the environment says done, after `method.max_turns` turns, or when the next
turn would not fit in `data.max_length`. Its rewards (summed over turns) are added to the score.

`ToolEnv` is the tool-use environment: tools are Python functions (type hints and a docstring
give their JSON schema, as in transformers' chat templates); a turn with tool calls gets their
results as the next observation, a turn without one is the answer, scored by `score`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distft.errors import ConfigError
from distft.methods.rl.rollout import Rollouts, layout, sample
from distft.runtime import dist

Observation = str | list[dict] | None

# The tiny model's tool-call format (its chat template has no tool syntax of its own): a call is
# `[name:argument]`, e.g. `[calc:37*45]`, with the argument passed as the tool's `expression`.
TINY_RESPONSE_TEMPLATE = {
    "start_anchor": "<|assistant|>",
    "defaults": {"role": "assistant"},
    "fields": {
        "tool_calls": {
            "open_pattern": r"\[(?P<name>\w+):",
            "close": "]",
            "repeats": True,
            "content": "text",
            "transform": {
                "type": "function",
                "function": {"name": "{name}", "arguments": {"expression": "{content}"}},
            },
        },
        "content": {"close_pattern": r"<\|end\|>|$", "content": "text"},
    },
}


@dataclass
class EnvStep:
    observation: Observation = None
    """Appended before the next turn (masked out of the loss); None when done."""
    reward: float = 0.0
    done: bool = True


class Environment:
    """One episode. Subclasses implement `step`; `reset` defaults to the row's prompt."""

    tools: list[Callable] = []
    """Functions offered to the model (rendered into the prompt by chat templates that list tools)."""

    def reset(self, row: dict) -> Observation:
        if "messages" in row:
            msgs = row["messages"]
            last = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            return msgs[: last[-1]] if last else msgs
        return str(row["prompt"])

    def step(self, completion: str, message: dict) -> EnvStep:
        raise NotImplementedError


class ToolEnv(Environment):
    """Tool use: each turn's tool calls are run and their results are the next observation; the
    first turn without a tool call is the answer, scored by `score` (a tool that raises returns
    its error as the result and is counted in `tool_failures`)."""

    def __init__(self):
        self.row: dict = {}
        self.tool_calls = 0
        self.tool_failures = 0

    def reset(self, row: dict) -> Observation:
        self.row = row
        return super().reset(row)

    def step(self, completion: str, message: dict) -> EnvStep:
        calls = message.get("tool_calls") or []
        if not calls:
            return EnvStep(None, self.score(str(message.get("content") or ""), self.row), True)
        by_name = {t.__name__: t for t in self.tools}
        results = []
        for call in calls:
            self.tool_calls += 1
            fn = call.get("function", {})
            name = fn.get("name", "?")
            try:
                if name not in by_name:
                    raise ValueError(f"unknown tool {name!r}")
                result = str(by_name[name](**(fn.get("arguments") or {})))
            except Exception as e:  # the model's call is bad: it sees the error, as a user's tools would
                self.tool_failures += 1
                result = f"error: {e}"
            results.append({"role": "tool", "name": name, "content": result})
        return EnvStep(results, 0.0, False)

    def score(self, answer: str, row: dict) -> float:
        raise NotImplementedError


def validate_env(cfg) -> None:
    m = cfg.method
    env = getattr(m, "env", None)
    if env is None:
        return
    if not isinstance(env, dict) or "_target_" not in env:
        raise ConfigError(
            f"method.env={env!r}: give {{_target_: dotted.path.to.EnvironmentClass, **kwargs}} "
            "(e.g. method.env={_target_: distft.methods.rl.env_calc.CalculatorEnv})"
        )
    if m.name != "grpo":
        raise ConfigError(
            f"method.env works with method=grpo (sequence-level advantages); method={m.name} "
            "assigns per-token credit that observation tokens between turns would break"
        )
    env_factory(env)  # the class must import now, not at the first rollout


def env_factory(spec: dict) -> Callable[[], Environment]:
    from hydra.utils import instantiate

    try:
        factory = instantiate(dict(spec), _partial_=True)
    except Exception as e:
        raise ConfigError(
            f"method.env._target_={spec.get('_target_')!r} does not instantiate ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); give an importable Environment class"
        ) from None
    return factory


def env_class(cfg) -> type | None:
    """The class of `method.env` (for its optional `default_rows(n, seed)` / `warmup_rows(n, seed)`)."""
    spec = getattr(cfg.method, "env", None)
    if not spec:
        return None
    from hydra.utils import get_class

    return get_class(spec["_target_"])


def response_template(tokenizer) -> dict | None:
    """The template that parses a turn into content and tool calls: the tokenizer's own, TRL's
    for the chat templates it knows, the tiny model's format, or None (turns are plain text)."""
    own = getattr(tokenizer, "response_template", None)
    if own is not None:
        return own
    from distft.models.tiny import CHAT_TEMPLATE

    if tokenizer.chat_template == CHAT_TEMPLATE:
        return TINY_RESPONSE_TEMPLATE
    try:
        from trl.chat_template_utils import add_response_schema

        return getattr(add_response_schema(tokenizer), "response_template", None)
    except ValueError:  # a chat template TRL does not know
        return None


class Renderer:
    """Token ids of prompts and observations through the tokenizer's chat template."""

    def __init__(self, tokenizer, tools: list[Callable]):
        self.tok = tokenizer
        self.tools = tools or None
        self.template = response_template(tokenizer)
        if tools and self.template is None:
            raise ConfigError(
                "method.env offers tools, but this tokenizer's chat template has no response template "
                "to parse tool calls with; set tokenizer.response_template (transformers' chat "
                "response parsing) in the model's tokenizer_config.json"
            )

    def prompt(self, obs: Observation) -> tuple[str, list[int]]:
        if isinstance(obs, str):
            return obs, self.tok(obs, add_special_tokens=True)["input_ids"]
        text = self.tok.apply_chat_template(obs, tools=self.tools, tokenize=False, add_generation_prompt=True)
        return text, self.tok(text, add_special_tokens=False)["input_ids"]

    def observation(self, obs: Observation) -> list[int]:
        """Tokens that follow a finished turn: plain text, or messages rendered as the chat
        template renders them after an assistant turn (with the next generation prompt)."""
        if isinstance(obs, str):
            return self.tok(obs, add_special_tokens=False)["input_ids"]
        name = next((m.get("name") for m in obs if m.get("name")), "tool")
        turn = [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}],
            },
        ]
        before = self.tok.apply_chat_template(turn, tokenize=False)
        after = self.tok.apply_chat_template(turn + list(obs), tokenize=False, add_generation_prompt=True)
        if not after.startswith(before):
            raise ConfigError(
                "the chat template renders an assistant turn differently once more messages follow"
            )
        eos = self.tok.eos_token
        cut = before.rfind(eos) + len(eos) if eos and eos in before else len(before)
        return self.tok(after[cut:], add_special_tokens=False)["input_ids"]

    def parse(self, completion_ids: list[int], prefix: str) -> dict:
        text = self.tok.decode(completion_ids, skip_special_tokens=False)
        if self.template is None:
            return {"role": "assistant", "content": self.tok.decode(completion_ids, skip_special_tokens=True)}
        try:
            return self.tok.parse_response(text, self.template, prefix=prefix, tools=self.tools)
        except Exception:  # output the template cannot parse is an answer without tool calls
            return {"role": "assistant", "content": self.tok.decode(completion_ids, skip_special_tokens=True)}


@dataclass
class Episodes:
    rollouts: Rollouts
    rewards: torch.Tensor
    """Environment reward per episode (summed over turns)."""
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(sum, count) metrics: env/turns, env/tool_calls, env/tool_failures, env/truncated."""


@torch.no_grad()
def run_episodes(
    model, tokenizer, rows: list[dict], cfg, device, synced: bool, greedy: bool = False
) -> Episodes:
    """One episode per row, all turns batched: every active episode's next turn is sampled in one
    `generate` call. With sharded weights every rank runs the same number of calls (a rank whose
    episodes are all done samples a dummy turn)."""
    m = cfg.method
    make = env_factory(m.env)
    envs: list[Environment] = [make() for _ in rows]
    render = Renderer(tokenizer, list(getattr(envs[0], "tools", []) or []))
    prompts, prompt_ids = zip(*(render.prompt(e.reset(dict(r))) for e, r in zip(envs, rows)))
    prompts, prompt_ids = list(prompts), list(prompt_ids)
    n = len(rows)
    gen: list[list[int]] = [[] for _ in range(n)]
    actions: list[list[int]] = [[] for _ in range(n)]
    rewards = torch.zeros(n, dtype=torch.float64)
    answers = [""] * n
    stopped = [False] * n
    turns = [0] * n
    truncated = [0] * n
    active = list(range(n))
    for turn in range(m.max_turns):
        if synced:
            (busy,) = dist.all_reduce_sum([float(len(active))], device)
            if busy == 0:
                break
        elif not active:
            break
        batch = [prompt_ids[i] + gen[i] for i in active] or [prompt_ids[0]]
        new, stop = sample(model, tokenizer, batch, cfg, device, synced, greedy)
        still = []
        for i, ids, s in zip(active, new, stop):
            prefix = tokenizer.decode(prompt_ids[i] + gen[i], skip_special_tokens=False)
            gen[i] += ids
            actions[i] += [1] * len(ids)
            turns[i] += 1
            stopped[i] = s
            message = render.parse(ids, prefix)
            answers[i] = str(message.get("content") or "")
            out = envs[i].step(render.tok.decode(ids, skip_special_tokens=True), message)
            rewards[i] += float(out.reward)
            if out.done or out.observation is None or turn == m.max_turns - 1:
                continue
            obs = render.observation(out.observation)
            if len(prompt_ids[i]) + len(gen[i]) + len(obs) + m.max_new_tokens > cfg.data.max_length:
                truncated[i] = 1
                continue
            gen[i] += obs
            actions[i] += [0] * len(obs)
            still.append(i)
        active = still
    roll = layout(tokenizer, prompts, prompt_ids, gen, stopped, actions=actions, texts=answers)
    stats = {
        "env/turns": (float(sum(turns)), n),
        "env/truncated": (float(sum(truncated)), n),
        "env/tool_calls": (float(sum(getattr(e, "tool_calls", 0) for e in envs)), n),
        "env/tool_failures": (float(sum(getattr(e, "tool_failures", 0) for e in envs)), n),
    }
    return Episodes(roll, rewards, stats)
