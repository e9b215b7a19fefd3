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
    text, spans, add_eos = render(row, tokenizer)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        target = train_on_prompt or any(s <= a < e for s, e in spans if b > a)
        labels.append(tok if target else IGNORE)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if labels:
        labels[0] = IGNORE  # the first token has no previous token to predict it from
    truncated = len(ids) > max_length
    return Tokenized(ids[:max_length], labels[:max_length], truncated)


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
