"""Judges: given a prompt and N distinct completions, say which is best and which is worst.

Every judge returns a `Verdict` or raises `JudgeError` (counted as a skipped prompt); a
`JudgeFatal` (bad key, unknown model, wrong URL) stops the command at once.
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distft.data.default_tasks import TASKS
from distft.errors import ConfigError, DistftError
from distft.rlaif import secrets


class JudgeError(Exception):
    """This prompt could not be judged (endpoint failure, unparseable or tied verdict)."""


class JudgeFatal(DistftError):
    """The judge cannot work at all; retrying other prompts is pointless."""


@dataclass
class Verdict:
    best: int
    worst: int
    reason: str = ""
    scores: list[float] = field(default_factory=list)


def from_scores(scores: list[float], reason: str = "") -> Verdict:
    if len(set(scores)) < 2:
        raise JudgeError(f"tie: every completion scored {scores[0]}")
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return Verdict(best, worst, reason, [float(s) for s in scores])


# ---------------------------------------------------------------------------- python function
def default_task_judge(prompt: str, completions: list[str], row: dict | None = None) -> dict:
    """Graded correctness on the embedded default task ("reverse abc=" → "cba", "sort ..."):
    difflib's similarity ratio to the right answer (1.0 only when exactly right), so partly
    right answers earn partial credit."""
    task, _, word = prompt.rstrip("=").partition(" ")
    if task not in TASKS:
        raise JudgeError(f"not a default-task prompt: {prompt!r}")
    right = TASKS[task](word)
    scores = [difflib.SequenceMatcher(None, c.strip(), right).ratio() for c in completions]
    reason = f"similarity to the right answer {right!r}: {[round(s, 2) for s in scores]}"
    return {"scores": scores, "reason": reason}


def load_function(spec: str):
    module, sep, name = spec.partition(":")
    if not sep:
        module, _, name = spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"judge.function={spec!r} cannot be imported ({e}); give 'package.module:callable'"
        ) from None
    if not callable(fn):
        raise ConfigError(f"judge.function={spec!r} is not callable")
    return fn


class PythonJudge:
    def __init__(self, cfg):
        self.fn = load_function(cfg.judge.function)
        self.name = f"python:{cfg.judge.function}"

    def __call__(self, prompt: str, completions: list[str], row: dict) -> Verdict:
        try:
            out = self.fn(prompt, completions, row)
        except JudgeError:
            raise
        except Exception as e:  # the user's function failed on this prompt: skip it, counted
            raise JudgeError(f"{self.name} raised {type(e).__name__}: {e}") from None
        return parse_result(out, len(completions))


def parse_result(out, n: int) -> Verdict:
    """A judge function's or endpoint's answer: scores, or best/worst indices (0-based), + reason."""
    if isinstance(out, Verdict):
        return out
    if isinstance(out, (list, tuple)):
        out = {"scores": list(out)}
    if not isinstance(out, dict):
        raise JudgeError(f"judge returned {type(out).__name__}; expected scores or a dict")
    reason = str(out.get("reason", ""))
    if "scores" in out:
        scores = out["scores"]
        if len(scores) != n or not all(isinstance(s, (int, float)) for s in scores):
            raise JudgeError(f"judge returned scores {scores!r} for {n} completions")
        if not all(s == s and abs(s) != float("inf") for s in scores):
            raise JudgeError(f"judge returned non-finite scores {scores!r}")
        return from_scores(scores, reason)
    best, worst = out.get("best"), out.get("worst")
    if worst is None and n == 2 and isinstance(best, int):
        worst = 1 - best
    if not (isinstance(best, int) and isinstance(worst, int) and 0 <= best < n and 0 <= worst < n):
        raise JudgeError(f"judge verdict {out!r} does not name a best and a worst of {n} completions")
    if best == worst:
        raise JudgeError("judge named the same completion best and worst")
    return Verdict(best, worst, reason)


# ---------------------------------------------------------------------------- local HF models
def is_reward_model(path: str) -> bool:
    """A `method=reward` export (full or adapter) or any one-output sequence classifier."""
    meta = Path(path) / "distft_export.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("method") == "reward"
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return False
    heads = [a for a in config.architectures or [] if a.endswith("ForSequenceClassification")]
    return bool(heads) and config.num_labels == 1


class RewardModelJudge:
    """Scores each completion with a reward model (e.g. a `method=reward` export), reading the
    sequence the way it was trained: prompt + completion + EOS (or the chat template's turn)."""

    def __init__(self, cfg, info, path: str):
        from transformers import AutoModelForSequenceClassification

        from distft.models import load_tokenizer

        self.name = f"reward-model:{path}"
        self.tokenizer = load_tokenizer(path, cfg)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(info.device).eval()
        self.device = info.device

    @torch.no_grad()
    def __call__(self, prompt: str, completions: list[str], row: dict) -> Verdict:
        from distft.data.preference import BadRow, completion_ids, pad_sequences, prompt_ids, render

        tok, heads, tails = self.tokenizer, [], []
        raw = row.get("prompt", prompt)
        for c in completions:
            reply = [{"role": "assistant", "content": c}] if isinstance(raw, list) else c
            try:
                p_text, c_text, eos = render(raw, reply, tok)
            except BadRow as e:
                raise JudgeError(f"{self.name}: {e}") from None
            heads.append(prompt_ids(p_text, tok))
            tails.append(completion_ids(c_text, eos, tok))
        batch = pad_sequences(heads, tails, self.model.config.pad_token_id)
        out = self.model(
            input_ids=batch["input_ids"].to(self.device), position_ids=batch["position_ids"].to(self.device)
        )
        scores = out.logits[:, 0].float().tolist()
        return from_scores(scores, f"{self.name}: scores {[round(x, 3) for x in scores]}")


class HFJudge:
    """Pairwise verdicts from a causal LM: for completions a and b, the log-probs of the two verdict
    strings after the judge prompt, in both orders (cancelling position bias), give
    P(a beats b); a completion's score is its summed win probability over all others."""

    def __init__(self, cfg, info, sampler_path: str):
        from distft.models import load_model, load_tokenizer

        self.cfg = cfg.judge
        path = cfg.judge.model or sampler_path
        self.name = f"hf:{path}"
        self.tokenizer = load_tokenizer(path, cfg)
        self.model = load_model(path, cfg, torch.float32, {}, None).to(info.device).eval()
        self.device = info.device

    def _prompt(self, prompt: str, a: str, b: str) -> str:
        text = self.cfg.template.format(prompt=prompt, a=a, b=b)
        if self.cfg.use_chat_template:
            msgs = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text

    @torch.no_grad()
    def verdict_logps(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 2]: summed log-prob of each verdict string after each judge prompt."""
        from distft.data.preference import pad_sequences, prompt_ids
        from distft.methods.logprobs import model_logps

        tok = self.tokenizer
        heads = [prompt_ids(t, tok) for t in texts]
        tails = [list(tok(v, add_special_tokens=False)["input_ids"]) for v in self.cfg.verdicts]
        batch = pad_sequences(
            [h for h in heads for _ in tails], [t for _ in heads for t in tails], tok.pad_token_id
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return model_logps(self.model, batch)[0].view(len(texts), len(tails)).cpu()

    def __call__(self, prompt: str, completions: list[str], row: dict) -> Verdict:
        n = len(completions)
        pairs = list(itertools.combinations(range(n), 2))
        texts = []
        for i, j in pairs:  # both orders
            texts += [self._prompt(prompt, completions[i], completions[j])]
            texts += [self._prompt(prompt, completions[j], completions[i])]
        p_first = torch.softmax(self.verdict_logps(texts), dim=-1)[:, 0]  # P(verdict "A")
        wins = [0.0] * n
        for k, (i, j) in enumerate(pairs):
            p_i = (float(p_first[2 * k]) + 1.0 - float(p_first[2 * k + 1])) / 2  # i was A, then B
            wins[i] += p_i
            wins[j] += 1.0 - p_i
        v = from_scores(wins)
        v.reason = f"{self.name}: summed pairwise win probability {[round(w, 3) for w in wins]}"
        return v


# ---------------------------------------------------------------------------- OpenAI-compatible endpoint
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIJudge:
    def __init__(self, cfg):
        self.cfg = cfg.judge
        self.url = self.cfg.url.rstrip("/") + "/chat/completions"
        self.name = f"openai:{self.cfg.model}@{self.cfg.url}"
        self.key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""

    def message(self, prompt: str, completions: list[str]) -> str:
        listed = "\n\n".join(f"[{i + 1}]\n{c}" for i, c in enumerate(completions))
        return (
            f"Prompt:\n{prompt}\n\nCandidate responses:\n{listed}\n\n"
            f"Which of the {len(completions)} responses is best and which is worst? Reply with JSON only: "
            '{"best": <number>, "worst": <number>, "reason": "<one sentence>"}'
        )

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.cfg.retries):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = secrets.redact(e.read().decode(errors="replace"))[:200]  # bodies may echo the key
                if e.code in (400, 401, 403, 404):
                    raise JudgeFatal(
                        f"judge endpoint {self.url} rejected the request ({e.code} {e.reason}: {detail}); "
                        "check judge.url, judge.model and the key in judge.api_key_env"
                    ) from None
                last = f"HTTP {e.code} {e.reason}"
                if e.code not in RETRY_STATUS:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e))
            except json.JSONDecodeError:
                last = "the response was not JSON"
        raise JudgeError(f"judge endpoint {self.url} failed after {self.cfg.retries} attempt(s): {last}")

    def __call__(self, prompt: str, completions: list[str], row: dict) -> Verdict:
        body = {
            "model": self.cfg.model,
            "messages": [
                {"role": "system", "content": self.cfg.system},
                {"role": "user", "content": self.message(prompt, completions)},
            ],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        reply = self._post(body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"judge endpoint reply has no choices[0].message.content: {str(reply)[:200]}"
            ) from None
        return parse_reply(content, len(completions))


def parse_reply(content: str, n: int) -> Verdict:
    """The judge's JSON verdict (1-based numbers) from a chat reply, tolerating text around it."""
    m = re.search(r"\{.*\}", content or "", re.DOTALL)
    if not m:
        raise JudgeError(f"judge reply has no JSON verdict: {content[:200]!r}")
    try:
        out = json.loads(m.group(0))
    except json.JSONDecodeError:
        raise JudgeError(f"judge reply is not valid JSON: {m.group(0)[:200]!r}") from None
    if not isinstance(out, dict):
        raise JudgeError(f"judge reply is not a JSON object: {m.group(0)[:200]!r}")
    for key in ("best", "worst"):
        if key in out:
            try:
                out[key] = int(out[key]) - 1
            except (TypeError, ValueError):
                raise JudgeError(f"judge reply's {key!r} is not a number: {out[key]!r}") from None
    return parse_result(out, n)


def make_judge(cfg, info, sampler_path: str):
    kind = cfg.judge.type
    if kind == "python":
        return PythonJudge(cfg)
    if kind == "hf":
        path = cfg.judge.model or sampler_path
        if is_reward_model(path):
            return RewardModelJudge(cfg, info, path)
        return HFJudge(cfg, info, sampler_path)
    return OpenAIJudge(cfg)
