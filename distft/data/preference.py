"""Preference data: rows of `prompt`/`chosen`/`rejected` (plain text or chat messages) → token ids.

Accepted row shapes (extra fields such as a judge's `reason` are ignored):
- text: {"prompt": "...", "chosen": "...", "rejected": "..."}; EOS is appended to each completion.
- chat: {"prompt": [{role, content}, ...], "chosen": [{"role": "assistant", ...}] or "text", "rejected": ...};
  rendered with the tokenizer's chat template (the template's end-of-turn closes the completion).
- implicit prompt (chat): {"chosen": [...conversation], "rejected": [...conversation]} without `prompt`:
  the messages both share form the prompt.

Prompt and completion are tokenized separately and concatenated, so the completion tokens are the
same ids a sampler would generate after the prompt. Rows that cannot be used (a field missing,
chosen identical to rejected, nothing left after truncation) are counted by reason in the data
report and skipped, up to `method.max_skip_fraction` of a split; beyond that the run stops with a
message naming the first bad rows.
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from dataclasses import dataclass, field

import torch

from distft.data.default_tasks import TASKS
from distft.data.schemas import implicit_prompt
from distft.errors import DataError

IGNORE = -100
PAIR_FIELDS = (
    "'prompt', 'chosen' and 'rejected' (text, or chat messages: 'prompt' a list of {role, content}, "
    "'chosen'/'rejected' assistant messages or text)"
)


class BadRow(Exception):
    """A row that is skipped (counted in the data report); the message says why."""


# ---------------------------------------------------------------------------- embedded default data
def _wrong_answers(task: str, word: str, rng: random.Random) -> list[str]:
    """Plausible wrong answers, most plausible first: the other task's answer, the word copied
    unchanged, the right answer with two neighbouring letters swapped."""
    other = next(t for t in sorted(TASKS) if t != task)
    right = TASKS[task](word)
    swapped = list(right)
    i = rng.randrange(len(right) - 1)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    return [TASKS[other](word), word, "".join(swapped)]


def default_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs on the default SFT task (reverse / sort letters): chosen is the right
    answer, rejected the most plausible wrong one that differs from it."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < n:
        task = rng.choice(sorted(TASKS))
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        right = TASKS[task](word)
        wrong = next((w for w in _wrong_answers(task, word, rng) if w != right), None)
        if wrong is None:  # e.g. "aaa": every answer is right
            continue
        rows.append(
            {
                "prompt": f"{task} {word}=",
                "chosen": right,
                "rejected": wrong,
                "_source": f"<default preference data>:{len(rows) + 1}",
            }
        )
    return rows


def default_prompts(n: int, seed: int = 0) -> list[dict]:
    """Prompts of the default task (for sampling, e.g. RLAIF), with the right answer kept aside."""
    return [
        {"prompt": r["prompt"], "answer": r["chosen"], "_source": r["_source"]}
        for r in default_pairs(n, seed)
    ]


# ---------------------------------------------------------------------------- row → text
def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def as_messages(x, what: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": "assistant", "content": x}]
    if _is_messages(x):
        return x
    raise BadRow(f"'{what}' must be text or a list of {{role, content}} messages")


def split_pair(row: dict) -> tuple[object, object, object]:
    """(prompt, chosen, rejected) of a row: each text, or message lists when the row is chat."""
    missing = [k for k in ("chosen", "rejected") if row.get(k) in (None, "", [])]
    if missing:
        found = sorted(k for k in row if not k.startswith("_"))
        raise BadRow(
            f"missing {' and '.join(repr(k) for k in missing)} (found {found}; expected {PAIR_FIELDS})"
        )
    if row.get("prompt") is None:  # rows that did not pass through the schema mapping
        try:
            row = implicit_prompt(row, "row")
        except DataError as e:
            raise BadRow(str(e)) from None
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, list):
        if not _is_messages(prompt):
            raise BadRow("'prompt' must be text or a list of {role, content} messages")
        chosen, rejected = as_messages(chosen, "chosen"), as_messages(rejected, "rejected")
    elif not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
        raise BadRow("with a text 'prompt', 'chosen' and 'rejected' must be text too")
    if chosen == rejected:
        raise BadRow("'chosen' and 'rejected' are identical (no preference to learn)")
    return prompt, chosen, rejected


def render(prompt, completion, tokenizer) -> tuple[str, str, bool]:
    """(prompt text, completion text, append EOS?) for a text or chat prompt/completion."""
    if isinstance(prompt, str):
        return prompt, str(completion), True
    if tokenizer.chat_template is None:
        raise DataError(
            "chat 'messages' need a tokenizer with a chat template; this model's tokenizer has none "
            "(use text prompt/chosen/rejected rows)"
        )
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(head):
        raise BadRow("the chat template renders the prompt differently once a reply follows")
    return head, full[len(head) :], False


def prompt_ids(text: str, tokenizer) -> list[int]:
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))  # a chat template may already write BOS
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def completion_ids(text: str, add_eos: bool, tokenizer) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def fit(prompt: list[int], completions: list[list[int]], max_length: int) -> tuple[list, list, bool]:
    """Truncate to max_length: the prompt loses tokens from the left (down to half the budget),
    then completions are cut at the end."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False
    keep = max(max_length - longest, max_length // 2)
    prompt = prompt[-keep:] if keep < len(prompt) else prompt
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions], True


# ---------------------------------------------------------------------------- skips with a limit
@dataclass
class Skips:
    """Counts skipped rows by reason; `check` stops the run when too many were skipped."""

    max_fraction: float
    what: str = "preference"
    counts: Counter = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)

    def add(self, row: dict, reason: str) -> None:
        self.counts[reason.split(" (")[0]] += 1
        if len(self.first) < 3:
            self.first.append(f"{row.get('_source', '?')}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def check(self, rows: int) -> None:
        if not self.total or math.isinf(self.max_fraction):  # inf: the caller checks the whole split
            return
        if self.total > self.max_fraction * rows:
            raise DataError(
                f"{self.total} of {rows} {self.what} rows are unusable, more than "
                f"method.max_skip_fraction={self.max_fraction}; first: {'; '.join(self.first)}"
            )
        print(f"distft: skipped {self.total} of {rows} rows: {dict(self.counts)}", flush=True)

    def report(self) -> dict:
        out = {"skipped": self.total, "skipped_by_reason": dict(self.counts)}
        if math.isinf(self.max_fraction):  # a chunk of a split: its caller needs the first bad rows
            out["skipped_first"] = list(self.first)
        return out

    @classmethod
    def of_split(cls, stats: dict, max_fraction: float, what: str) -> Skips:
        """The skips of a split encoded in chunks (each with max_fraction=inf), from merged stats."""
        return cls(max_fraction, what, Counter(stats["skipped_by_reason"]), stats.pop("skipped_first")[:3])


# ---------------------------------------------------------------------------- encode / collate
def encode_pairs(rows: list[dict], tokenizer, max_length: int, max_skip_fraction: float) -> tuple[list, dict]:
    """Rows → {"prompt_ids", "chosen_ids", "rejected_ids"} examples and data-report stats."""
    skips = Skips(max_skip_fraction)
    examples, truncated = [], 0
    for row in rows:
        try:
            prompt, chosen, rejected = split_pair(row)
            p_text, c_text, eos = render(prompt, chosen, tokenizer)
            _, r_text, _ = render(prompt, rejected, tokenizer)
            p = prompt_ids(p_text, tokenizer)
            c, r = completion_ids(c_text, eos, tokenizer), completion_ids(r_text, eos, tokenizer)
            p, (c, r), cut = fit(p, [c, r], max_length)
            if not c or not r:
                raise BadRow(f"no completion tokens left within data.max_length={max_length}")
            if c == r:
                raise BadRow("'chosen' and 'rejected' are identical after truncation")
        except BadRow as e:
            skips.add(row, str(e))
            continue
        truncated += cut
        ex = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        if isinstance(row.get("margin"), (int, float)):  # optional: how much better chosen is
            ex["margin"] = float(row["margin"])
        examples.append(ex)
    skips.check(len(rows))
    lengths = sorted(
        len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples
    )
    stats = {"truncated": truncated, **skips.report(), "tokens_max": lengths[-1] if lengths else 0}
    return examples, stats


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Right-padded prompt+completion rows with completion-only labels; positions continue over
    the padding (never attended to by real tokens in a causal model)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids, labels, pos, mask = [], [], [], []
    for p, c, s in zip(prompts, completions, seqs):
        extra = width - len(s)
        lab = [IGNORE] * len(p) + list(c)
        lab[0] = IGNORE  # the first token has no previous token to predict it
        ids.append(s + [pad_id] * extra)
        labels.append(lab + [IGNORE] * extra)
        pos.append(list(range(width)))
        mask.append([1] * len(s) + [0] * extra)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(pos),
        "attention_mask": torch.tensor(mask),
    }


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """One batch of 2B rows, chosen first then rejected (one forward for both halves, which also
    keeps sharded models' forward counts equal on every rank). `num_targets` counts pairs."""
    prompts = [e["prompt_ids"] for e in examples]
    batch = pad_sequences(
        prompts + prompts, [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], pad_id
    )
    batch["num_targets"] = len(examples)
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    if any("margin" in e for e in examples):
        batch["margins"] = torch.tensor([e.get("margin", 0.0) for e in examples])
    if all("ref_chosen" in e for e in examples):  # precomputed reference log-probs
        batch["ref_logps"] = torch.tensor(
            [e["ref_chosen"] for e in examples] + [e["ref_rejected"] for e in examples], dtype=torch.float64
        )
    return batch


class PairRows:
    """What methods trained on prompt/chosen/rejected pairs share (`method=dpo`, `method=reward`):
    the embedded default pairs, encoding, collation. Needs `self.tokenizer`."""

    encode_chunks = True  # each row encodes alone: a split may be encoded in chunks (distft/data/encode.py)

    @staticmethod
    def default_rows(cfg) -> list[dict]:
        return default_pairs(cfg.data.num_examples)

    @staticmethod
    def encode(rows: list[dict], tokenizer, cfg, train: bool) -> tuple[list[dict], dict]:
        return encode_pairs(rows, tokenizer, cfg.data.max_length, cfg.method.max_skip_fraction)

    def collate(self, examples: list[dict]) -> dict:
        return collate_pairs(examples, self.tokenizer.pad_token_id)
