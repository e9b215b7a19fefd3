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


def tokenize_sft_batch(
    rows: list[dict], tokenizer, max_length: int, train_on_prompt: bool
) -> list[Tokenized]:
    """tokenize_sft of every row, with one batched tokenizer call (the fast tokenizer's
    encode_batch gives each text the ids and offsets it gives alone) and the labels from the
    offsets in numpy: a token is a target when it starts inside a span and is not empty."""
    import numpy as np

    rendered = [render(row, tokenizer) for row in rows]
    if not rendered:
        return []
    all_ids, all_offsets = encode_texts(tokenizer, [r[0] for r in rendered], offsets=True)
    eos = tokenizer.eos_token_id
    out = []
    for (_, spans, add_eos), ids, offsets in zip(rendered, all_ids, all_offsets):
        ids = list(ids)
        if train_on_prompt:
            labels = list(ids)
        else:
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            a, b = off[:, 0], off[:, 1]
            target = np.zeros(len(ids), dtype=bool)
            for s, e in spans:
                target |= (s <= a) & (a < e)
            target &= b > a
            labels = np.where(target, np.asarray(ids, dtype=np.int64), IGNORE).tolist()
        if add_eos and eos is not None:
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
