"""Turn SFT rows (prompt/completion or chat messages) into token ids and completion-only labels.

Labels are found by character spans in the rendered text, so tokenizers that merge across the
prompt/completion boundary are handled, and the EOS / end-of-turn token is always a target.
"""

from __future__ import annotations

from dataclasses import dataclass

from distft.errors import DataError

IGNORE = -100
SFT_FIELDS = "'prompt' and 'completion', or 'messages' (a list of {role, content})"


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def render(row: dict, tokenizer) -> tuple[str, list[tuple[int, int]], bool]:
    """Text of a row, the character spans to train on, and whether to append EOS."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in msgs
        ):
            raise DataError(
                f"{row.get('_source', '?')}: 'messages' must be a list of objects with 'role' and 'content'"
            )
        if tokenizer.chat_template is None:
            raise DataError(
                f"{row.get('_source', '?')}: chat 'messages' need a tokenizer with a chat "
                "template; this model's tokenizer has none (use prompt/completion rows)"
            )
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(_chat(tokenizer, msgs[:i], generation_prompt=True))
            end = len(_chat(tokenizer, msgs[: i + 1], generation_prompt=False))
            spans.append((start, end))
        return _chat(tokenizer, msgs, generation_prompt=False), spans, False
    if "prompt" in row and "completion" in row:
        prompt, completion = str(row["prompt"]), str(row["completion"])
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], True
    found = sorted(k for k in row if not k.startswith("_"))
    raise DataError(
        f"{row.get('_source', '?')}: missing fields for SFT; found {found}, expected {SFT_FIELDS}"
    )


def _chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_sft(row: dict, tokenizer, max_length: int, train_on_prompt: bool) -> Tokenized:
    return tokenize_sft_batch([row], tokenizer, max_length, train_on_prompt)[0]


PRETOKENIZED = "_sft_tokens"
"""Row key under which a row may carry its `SftTokens` (computed while cleaning, distft/data/batched.py);
set only on the rows handed to the encoder, never written out."""


@dataclass
class SftTokens:
    """A row's rendered text as token ids, which of them are targets (they start inside a span of
    the answer and are not empty), and whether the encoder appends EOS: before truncation."""

    ids: object  # np.ndarray of ints
    targets: object  # np.ndarray of bool
    add_eos: bool


def sft_tokens(rows: list[dict], tokenizer, rendered: list | None = None) -> list[SftTokens]:
    """Each row's SftTokens, from one batched tokenizer call (the fast tokenizer's encode_batch
    gives each text the ids and offsets it gives alone) and the targets from the offsets in numpy,
    for the whole batch at once. `rendered`: the rows' `render` when the caller has it."""
    import itertools

    import numpy as np

    if rendered is None:
        rendered = [render(row, tokenizer) for row in rows]
    if not rendered:
        return []
    all_ids, all_offsets = encode_texts(tokenizer, [r[0] for r in rendered], offsets=True)
    counts = np.fromiter(map(len, all_ids), dtype=np.int64, count=len(all_ids))
    total = int(counts.sum())
    ids = np.fromiter(itertools.chain.from_iterable(all_ids), dtype=np.int64, count=total)
    chain = itertools.chain.from_iterable
    off = np.fromiter(chain(chain(all_offsets)), dtype=np.int64, count=2 * total).reshape(-1, 2)
    most = max(len(r[1]) for r in rendered)
    spans = np.zeros((len(rendered), max(most, 1), 2), dtype=np.int64)  # (0, 0): no span
    for k, (_, row_spans, _) in enumerate(rendered):
        if row_spans:
            spans[k, : len(row_spans)] = row_spans
    row_of = np.repeat(np.arange(len(rendered)), counts)
    a, b = off[:, 0:1], off[:, 1]
    targets = ((spans[row_of, :, 0] <= a) & (a < spans[row_of, :, 1])).any(axis=1) & (b > a[:, 0])
    ends = np.cumsum(counts)
    return [
        SftTokens(ids[e - n : e], targets[e - n : e], add_eos)
        for (_, _, add_eos), n, e in zip(rendered, counts.tolist(), ends.tolist())
    ]


def tokenize_sft_batch(
    rows: list[dict], tokenizer, max_length: int, train_on_prompt: bool
) -> list[Tokenized]:
    """tokenize_sft of every row (`sft_tokens`; rows that carry their SftTokens under PRETOKENIZED
    are not tokenized again)."""
    import numpy as np

    todo = [row for row in rows if PRETOKENIZED not in row]
    computed = iter(sft_tokens(todo, tokenizer))
    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        tok = row[PRETOKENIZED] if PRETOKENIZED in row else next(computed)
        ids = tok.ids.tolist()
        labels = list(ids) if train_on_prompt else np.where(tok.targets, tok.ids, IGNORE).tolist()
        if tok.add_eos and eos is not None:
            ids.append(eos)
            labels.append(eos)
        if labels:
            labels[0] = IGNORE  # the first token has no previous token to predict it from
        out.append(Tokenized(ids[:max_length], labels[:max_length], len(ids) > max_length))
    return out


def encode_texts(tokenizer, texts: list[str], offsets: bool) -> tuple[list[list[int]], list | None]:
    """Token ids (and character offsets) of each text, as `tokenizer(texts, add_special_tokens=True)`
    gives them. A fast tokenizer's Rust backend is called directly after one small call through
    transformers has set it up as every call does (no truncation, no padding, its special-token
    splitting): that call would only convert the same encodings into Python lists once more.
    Without offsets `encode_batch_fast` skips computing them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not texts or not hasattr(backend, "encode_batch_fast"):
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=offsets)
        return enc["input_ids"], enc["offset_mapping"] if offsets else None
    tokenizer(texts[:1], add_special_tokens=True)
    if offsets:
        encs = backend.encode_batch(texts, add_special_tokens=True)
        return [e.ids for e in encs], [e.offsets for e in encs]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)], None


def prompt_text(row: dict, tokenizer) -> str:
    """The generation prompt of a row (for exact-match eval)."""
    if "messages" in row:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return _chat(tokenizer, msgs[:last], generation_prompt=True)
    return str(row["prompt"])


def reference_answer(row: dict) -> str:
    if "messages" in row:
        return [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]
    return str(row["completion"])
