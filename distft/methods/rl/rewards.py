"""Rewards of rollouts: rule-based Python functions (named by dotted path, weighted) plus an
optional frozen reward model. A function that raises or returns a non-finite value does not
corrupt training: the affected rollouts are skipped, counted and logged, up to a limit.

Reward functions follow TRL's convention, so TRL's own (`trl.rewards.*`) work too:
`fn(prompts=[...], completions=[...], completion_ids=[...], stopped=[...], **row_columns)` returns
one float (or None: "does not apply", scored 0) per completion.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

from distft.errors import ConfigError

ANSWER_KEYS = ("answer", "solution", "completion")


def char_match(
    completions: list[str],
    stopped: list[bool] | None = None,
    position_weight: float = 0.5,
    letters_weight: float = 0.3,
    eos_bonus: float = 0.2,
    **columns,
) -> list[float]:
    """Graded reward for tasks with one right answer (the default sort/reverse task), in [0, 1]:
    `position_weight` × the fraction of characters right in place, `letters_weight` × the fraction
    of the answer's characters present at all (as a multiset), `eos_bonus` for stopping with EOS.
    Extra characters count against both fractions. Partial credit keeps the signal dense for a
    weak policy; only the exact answer with EOS earns 1."""
    key = next((k for k in ANSWER_KEYS if k in columns), None)
    if key is None:
        raise ValueError(f"char_match needs a reference column ({' or '.join(ANSWER_KEYS)}) in the data")
    stopped = stopped if stopped is not None else [True] * len(completions)
    out = []
    for text, answer, stop in zip(completions, columns[key], stopped):
        text, answer = text.strip(), str(answer).strip()
        longest = max(len(text), len(answer), 1)
        in_place = sum(a == b for a, b in zip(text, answer)) / longest
        common = sum((Counter(text) & Counter(answer)).values()) / longest
        out.append(position_weight * in_place + letters_weight * common + eos_bonus * float(stop))
    return out


def exact_match(completions: list[str], **columns) -> list[float]:
    """1 when the completion equals the reference answer (stripped), else 0."""
    key = next((k for k in ANSWER_KEYS if k in columns), None)
    if key is None:
        raise ValueError(f"exact_match needs a reference column ({' or '.join(ANSWER_KEYS)})")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, columns[key])]


OLD_PACKAGE = "distft.rl."


def resolve(target: str):
    """The callable at dotted path `target` (module.attr[.attr...])."""
    if target.startswith(OLD_PACKAGE):  # configs written before the RL blocks moved under methods/
        target = "distft.methods.rl." + target[len(OLD_PACKAGE) :]
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        if callable(obj):
            return obj
        break
    raise ConfigError(f"reward function _target_={target!r} is not an importable callable (module.name)")


@dataclass
class RewardFn:
    name: str
    fn: object
    weight: float


def build_reward_funcs(specs: list[dict]) -> list[RewardFn]:
    funcs = []
    for spec in specs:
        spec = dict(spec)
        target = spec.pop("_target_")
        weight = float(spec.pop("weight", 1.0))
        fn = resolve(target)
        if spec:  # the remaining keys are keyword arguments of the function
            fn = functools.partial(fn, **spec)
        funcs.append(RewardFn(target.rsplit(".", 1)[-1], fn, weight))
    return funcs


@dataclass
class Scores:
    total: torch.Tensor
    """Weighted reward per rollout (0 where invalid)."""
    valid: torch.Tensor
    """False where a reward function raised or returned a non-finite value."""
    per_func: dict[str, torch.Tensor] = field(default_factory=dict)
    failures: int = 0


class RewardScorer:
    """Scores rollouts with the configured functions and the optional reward model."""

    def __init__(self, cfg, tokenizer, device, place=None):
        """`place` puts the frozen reward model where it runs (the run's `Strategy.place_frozen`:
        sharded where the strategy shards); default: a replica on `device`."""
        self.funcs = build_reward_funcs(cfg.method.reward_funcs)
        self.tokenizer = tokenizer
        self.device = device
        self.reward_model = None
        self.rm_weight = cfg.method.reward_model_weight
        self.warned: set[str] = set()
        if cfg.method.reward_model:
            model, self.rm_tokenizer = load_reward_model(cfg.method.reward_model, cfg)
            self.reward_model = place(model) if place is not None else model.eval().to(device)

    def __call__(self, prompts, completions, completion_ids, stopped, rows, env_rewards=None) -> Scores:
        """`env_rewards`: a multi-turn environment's reward per rollout (method.env), added as `env`."""
        n = len(completions)
        columns: dict[str, list] = {}
        for key in sorted({k for r in rows for k in r if not k.startswith("_")}):
            columns[key] = [r.get(key) for r in rows]
        kwargs = {**columns, "stopped": stopped, "completion_ids": completion_ids}
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        per_func = {}
        for rf in self.funcs:
            values = self._call(rf, prompts, completions, kwargs, n)
            per_func[rf.name] = values
            valid &= torch.isfinite(values)
            total += rf.weight * torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        if env_rewards is not None:
            values = env_rewards.to(torch.float64)
            per_func["env"] = values
            valid &= torch.isfinite(values)
            total += torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        if self.reward_model is not None:
            values = self.score_with_model(prompts, completions)
            per_func["reward_model"] = values
            valid &= torch.isfinite(values)
            total += self.rm_weight * torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        total[~valid] = 0.0
        return Scores(total, valid, per_func, int((~valid).sum()))

    def _call(self, rf: RewardFn, prompts, completions, kwargs, n) -> torch.Tensor:
        """Rewards of one function; on an exception, retry row by row to isolate the bad rows."""
        try:
            return self._as_tensor(rf, rf.fn(prompts=prompts, completions=completions, **kwargs), n)
        except RewardUnavailable as e:  # a server that failed its retries: no row-by-row retry
            self._warn(rf.name, e)
            return self._as_tensor(rf, e.values, n)
        except Exception as e:  # a user function: any error is isolated, not fatal at once
            self._warn(rf.name, e)
        out = torch.full((n,), float("nan"), dtype=torch.float64)
        for i in range(n):
            row_kwargs = {k: v[i : i + 1] for k, v in kwargs.items()}
            try:
                out[i] = self._as_tensor(
                    rf, rf.fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **row_kwargs), 1
                )[0]
            except Exception:
                pass
        return out

    def _as_tensor(self, rf: RewardFn, values, n: int) -> torch.Tensor:
        if values is None or len(values) != n:
            got = "None" if values is None else f"{len(values)} values"
            raise ValueError(f"returned {got} for {n} completions")
        return torch.tensor([0.0 if v is None else float(v) for v in values], dtype=torch.float64)

    def _warn(self, name: str, e: Exception) -> None:
        if name not in self.warned:
            self.warned.add(name)
            print(
                f"distft: reward function {name} failed ({type(e).__name__}: {e}); the "
                "affected rollouts are skipped and counted as reward_failures",
                file=sys.stderr,
                flush=True,
            )

    @torch.no_grad()
    def score_with_model(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        tok = self.rm_tokenizer
        texts = [p + c for p, c in zip(prompts, completions)]
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok(texts, return_tensors="pt", padding=True).to(self.device)
        finally:
            tok.padding_side = side
        logits = self.reward_model(**enc).logits.float()
        return logits[:, 0].double().cpu()


class RewardUnavailable(RuntimeError):
    """A reward source failed for some rows after its retries; `values` holds the others (NaN
    where it failed), so only the failed rows are skipped and counted."""

    def __init__(self, message: str, values: list[float]):
        super().__init__(message)
        self.values = values


def http_reward(
    prompts: list[str],
    completions: list[str],
    url: str,
    batch_size: int = 64,
    timeout: float = 30.0,
    retries: int = 2,
    backoff: float = 0.5,
    workers: int = 4,
    **columns,
) -> list[float | None]:
    """A reward server (a verifier, a sandbox, an LLM judge) behind an HTTP endpoint.

    Rows go in batches of `batch_size` (up to `workers` requests in flight) as a JSON POST
    `{"prompts": [...], "completions": [...], <column>: [...]}` (row columns, `stopped`,
    `completion_ids`); the answer is `{"rewards": [float | null, ...]}`, one per row. Each
    request has `timeout` seconds and `retries` more tries (after `backoff` × 2^k seconds) on a
    connection error, a timeout, a 5xx or 429 status, or a malformed answer. Batches that still
    fail are skipped rows, counted against method.max_reward_failures."""
    from concurrent.futures import ThreadPoolExecutor

    rows = {"prompts": list(prompts), "completions": list(completions)}
    rows.update({k: list(v) for k, v in columns.items()})
    n = len(completions)
    spans = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    with ThreadPoolExecutor(max(1, min(workers, len(spans)))) as pool:
        results = list(pool.map(lambda ab: _post_batch(url, rows, *ab, timeout, retries, backoff), spans))
    values: list[float | None] = []
    errors = []
    for (a, b), (vals, err) in zip(spans, results):
        values += vals if vals is not None else [float("nan")] * (b - a)
        if err:
            errors.append(err)
    if errors:
        raise RewardUnavailable(f"{url}: {len(errors)} of {len(spans)} requests failed ({errors[0]})", values)
    return values


def _post_batch(url, rows, a, b, timeout, retries, backoff) -> tuple[list | None, str | None]:
    import json
    import time
    import urllib.error
    import urllib.request

    body = json.dumps({k: v[a:b] for k, v in rows.items()}).encode()
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                answer = json.loads(resp.read())
            values = answer["rewards"] if isinstance(answer, dict) else None
            if not isinstance(values, list) or len(values) != b - a:
                got = f"{len(values)} rewards" if isinstance(values, list) else "no 'rewards' list"
                error = f"answered {got} for {b - a} rows"
                continue
            return values, None
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code < 500 and e.code != 429:  # the request is wrong: retrying will not help
                break
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    return None, error


def load_reward_model(path: str, cfg):
    """A frozen `method=reward` export (AutoModelForSequenceClassification, one output)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
        )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"method.reward_model={path!r} does not load as a sequence-classification model ({e}); "
            "give the export/ directory of a method=reward run"
        ) from None
    if model.config.num_labels != 1:
        raise ConfigError(f"method.reward_model={path!r} has {model.config.num_labels} outputs; expected 1")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.requires_grad_(False)
    return model, tok
