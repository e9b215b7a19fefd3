"""Recognize a row's schema and map it to one canonical form per kind of data.

Canonical forms (what methods receive):
  sft            {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}
  preference     {"prompt", "chosen", "rejected"}
  classification {"text", "label"}
  prompt         {"prompt", ...}  (RL prompts; extra fields such as a reference answer pass through)

Accepted input formats: prompt/completion, Alpaca (instruction/input/output), OpenAI-style chat
`messages`, ShareGPT `conversations` (from/value), preference prompt/chosen/rejected and
classification text/label, and implicit-prompt pairs (chosen/rejected holding the prompt).
`data.columns` renames columns first (canonical name → column name),
`data.format` forces one format instead of detecting it per row.
"""

from __future__ import annotations

from collections.abc import Callable

from distft.errors import DataError

# format name → (required fields, kind). Detection tries them in this order.
FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "preference": (("prompt", "chosen", "rejected"), "preference"),
    "preference_implicit": (("chosen", "rejected"), "preference"),  # the prompt is their shared start
    "messages": (("messages",), "sft"),
    "sharegpt": (("conversations",), "sft"),
    "alpaca": (("instruction", "output"), "sft"),
    "prompt_completion": (("prompt", "completion"), "sft"),
    "classification": (("text", "label"), "classification"),
    "prompt": (("prompt",), "prompt"),
}
EXPECTED = (
    "prompt+completion, instruction+output (Alpaca, optional input), messages (OpenAI chat), "
    "conversations (ShareGPT), prompt+chosen+rejected or chosen+rejected (preference) or text+label "
    "(classification)"
)
KIND_FIELDS = {
    "sft": "prompt/completion, Alpaca instruction/input/output, chat messages or ShareGPT conversations",
    "preference": "prompt/chosen/rejected pairs",
    "classification": "text/label rows",
    "prompt": "prompts (a 'prompt' field)",
}
# Which row kinds a method's kind can train on: RL prompt methods take any row that has a prompt.
COMPATIBLE = {
    "sft": {"sft"},
    "preference": {"preference"},
    "classification": {"classification"},
    "prompt": {"prompt", "sft", "preference"},
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
    "observation": "tool",
}


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, (list, dict)) and not v)


def is_empty(row: dict) -> bool:
    """No field with content (besides our own `_` bookkeeping)."""
    return all(_blank(v) for k, v in row.items() if not k.startswith("_"))


def detect(row: dict) -> str | None:
    for name, (fields, _) in FORMATS.items():
        if all(f in row for f in fields):
            return name
    return None


def kind_of(fmt: str) -> str:
    return FORMATS[fmt][1]


def _content(value, where: str, turn: int) -> str:
    """Message content: a string, or OpenAI content parts [{"type": "text", "text": ...}]."""
    from distft.data import vision

    if vision.has_image_parts(value):  # images become inline markers (distft/data/vision.py)
        return vision.content_text(value, where, turn)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(_text(p.get("text"), where, f"turn {turn} content part 'text'") for p in value)
    return _text(value, where, f"turn {turn} 'content'")


def _messages(msgs, where: str, role_key: str, content_key: str, roles: dict | None) -> list[dict]:
    if not isinstance(msgs, list):
        raise DataError(f"{where}: expected a list of chat turns, got {type(msgs).__name__}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            found = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise DataError(
                f"{where}: turn {i} must be an object with '{role_key}' and '{content_key}'; found {found}"
            )
        role = str(m[role_key])
        if roles is not None:
            if role.lower() not in roles:
                raise DataError(
                    f"{where}: turn {i} has unknown ShareGPT role {role!r}; known: {', '.join(sorted(roles))}"
                )
            role = roles[role.lower()]
        out.append({"role": role, "content": _content(m[content_key], where, i)})
    return out


def _text(v, where: str = "?", name: str = "text") -> str:
    """A text field: a string (None is blank; a number read from CSV/Parquet becomes its digits).
    A dict or list would train on its Python repr, so it is refused with the row's file:line."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise DataError(
        f"{where}: field {name} is a {type(v).__name__} ({_preview(v)}), not a string; "
        "write the text itself as a JSON string (or map the right column with data.columns)"
    )


def _prompt_row(v, where: str) -> dict:
    """An RL prompt: text, or a conversation (list of {role, content}), kept as chat messages."""
    if isinstance(v, list):
        return {"messages": _messages(v, where, "role", "content", None)}
    return {"prompt": _text(v, where, "'prompt'")}


def _preview(v) -> str:
    import json

    text = json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _map_preference(row: dict, where: str) -> dict:
    out = {"prompt": row["prompt"]}
    for key in ("chosen", "rejected"):
        v = row[key]
        if isinstance(v, list):  # conversational preference data
            out[key] = _messages(v, where, "role", "content", None)
        else:
            out[key] = _text(v, where, f"'{key}'")
    if isinstance(out["prompt"], list):
        out["prompt"] = _messages(out["prompt"], where, "role", "content", None)
    elif not isinstance(out["prompt"], str):
        out["prompt"] = _text(out["prompt"], where, "'prompt'")
    return out


def implicit_prompt(row: dict, where: str) -> dict:
    """chosen/rejected that both hold the prompt (TRL's implicit-prompt form): the prompt is their
    common start — the shared leading turns of two conversations, or the shared leading words of
    two texts — and each side keeps the rest (at least one turn or word of its own)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen = _messages(chosen, where, "role", "content", None)
        rejected = _messages(rejected, where, "role", "content", None)
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    if isinstance(chosen, list) or isinstance(rejected, list):
        raise DataError(
            f"{where}: 'chosen' and 'rejected' must both be texts or both be message lists "
            "when the row has no 'prompt'"
        )
    chosen, rejected = _text(chosen, where, "'chosen'"), _text(rejected, where, "'rejected'")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # Cut after the last whitespace inside the shared part, leaving each side a character of its own.
    end = max(0, min(n, len(chosen) - 1, len(rejected) - 1))
    cut = max(chosen.rfind(" ", 0, end), chosen.rfind("\n", 0, end)) + 1
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _map_alpaca(row: dict, where: str) -> dict:
    instruction = _text(row["instruction"], where, "'instruction'")
    extra = _text(row.get("input"), where, "'input'")
    prompt = f"{instruction}\n{extra}\n" if extra.strip() else f"{instruction}\n"
    return {"prompt": prompt, "completion": _text(row["output"], where, "'output'")}


MAPPERS: dict[str, Callable[[dict, str], dict]] = {
    "preference": _map_preference,
    "preference_implicit": implicit_prompt,
    "messages": lambda r, w: {"messages": _messages(r["messages"], w, "role", "content", None)},
    "sharegpt": lambda r, w: {"messages": _messages(r["conversations"], w, "from", "value", SHAREGPT_ROLES)},
    "alpaca": _map_alpaca,
    "prompt_completion": lambda r, w: {
        "prompt": _text(r["prompt"], w, "'prompt'"),
        "completion": _text(r["completion"], w, "'completion'"),
    },
    "classification": lambda r, w: {"text": _text(r["text"], w, "'text'"), "label": r["label"]},
    "prompt": lambda r, w: _prompt_row(r["prompt"], w),
}
CONSUMED = {
    "preference": {"prompt", "chosen", "rejected"},
    "preference_implicit": {"chosen", "rejected"},
    "messages": {"messages"},
    "sharegpt": {"conversations"},
    "alpaca": {"instruction", "input", "output"},
    "prompt_completion": {"prompt", "completion"},
    "classification": {"text", "label"},
    "prompt": {"prompt"},
}


def rename(row: dict, columns: dict[str, str]) -> dict:
    """Apply data.columns (canonical name → the dataset's column name)."""
    if not columns:
        return row
    out = dict(row)
    for canonical, column in columns.items():
        if column in out and column != canonical:
            out[canonical] = out.pop(column)
    return out


def map_row(row: dict, fmt: str, where: str) -> dict:
    """Canonical row (plus pass-through fields and `_source`)."""
    mapped = MAPPERS[fmt](row, where)
    for k, v in row.items():
        if k not in CONSUMED[fmt] and k not in mapped:
            mapped[k] = v
    return mapped


def no_schema_error(row: dict, forced: str | None = None) -> DataError:
    where = row.get("_source", "?")
    found = sorted(k for k in row if not k.startswith("_"))
    if forced:
        need = ", ".join(FORMATS[forced][0])
        return DataError(
            f"{where}: data.format={forced} needs fields [{need}]; found {found}. "
            "Fix the row, map columns with data.columns={canonical: column}, or use data.format=auto"
        )
    return DataError(
        f"{where}: the row matches no known data schema; found fields {found}, expected {EXPECTED}. "
        "Map your columns with data.columns, e.g. data.columns={prompt: question, completion: answer}"
    )


def prompt_and_answer(row: dict) -> tuple[str, str]:
    """The input part and the target part of a canonical row (for near-dedup and reports)."""
    if "messages" in row:
        msgs = row["messages"]
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in msgs if m["role"] != "assistant")
        answer = "\n".join(m["content"] for m in msgs if m["role"] == "assistant")
        return prompt, answer
    if "chosen" in row and "rejected" in row:  # a pair (a half pair is the method's to reject)
        return _flat(row.get("prompt")), _flat(row["chosen"]) + "\n\x00\n" + _flat(row["rejected"])
    if "text" in row and "label" in row:
        return str(row["text"]), str(row["label"])
    if "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    return _flat(row.get("prompt", "")), ""


def completion_text(row: dict) -> str:
    """The first target text of a row (for 'most common first tokens of completions')."""
    if "messages" in row:
        return next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
    if "chosen" in row:
        return _flat(row["chosen"])
    if "completion" in row:
        return str(row["completion"])
    return ""


def _flat(v) -> str:
    if isinstance(v, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in v if isinstance(m, dict))
    return "" if v is None else str(v)


def length_text(row: dict, tokenizer) -> str:
    """The text a row is trained on, as close to the method's rendering as is generic."""
    if "messages" in row:
        from distft.data import vision

        if vision.has_images(row):  # image markers count as one image token (its expansion is the encoder's)
            return vision.length_text(row, tokenizer)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return "\n".join(m["content"] for m in row["messages"])
    if "chosen" in row and "rejected" in row:  # a pair (a half pair is the method's to reject)
        prompt = _flat(row.get("prompt"))
        return prompt + max(_flat(row["chosen"]), _flat(row["rejected"]), key=len)
    if "text" in row and "label" in row:
        return str(row["text"])
    if "completion" in row:
        return str(row["prompt"]) + str(row["completion"])
    return _flat(row.get("prompt", ""))


def required_texts(row: dict) -> list[str]:
    """Fields that must not be blank for the row to be usable."""
    if "messages" in row:
        # targets; RL prompt rows may have no assistant turn: then any content will do
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        return answers or ["".join(m["content"] for m in row["messages"])]
    if "chosen" in row and "rejected" in row:  # a pair (a half pair is the method's to reject)
        return [_flat(row["chosen"]), _flat(row["rejected"])]  # an empty prompt is allowed
    if "text" in row and "label" in row:
        return [str(row["text"]), "" if row["label"] is None else str(row["label"])]
    if "completion" in row:
        return [str(row["prompt"]), str(row["completion"])]
    return [_flat(row.get("prompt", ""))]


def to_canonical(
    rows: list[dict],
    fmt: str,
    columns: dict[str, str],
    method_kind: str | None,
    method_name: str,
    check_turns: bool = True,
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Map rows; returns (mapped rows, empty rows, rows per detected format). A row with content
    but no known schema, or of a kind the method cannot train on, is a DataError; so are SFT chat
    rows without an assistant turn (unless check_turns=False: a caller mapping batches checks
    them over all batches)."""
    mapped, empty, formats = [], [], {}
    for raw in rows:
        row = rename(raw, columns)
        if is_empty(row):
            empty.append(row)
            continue
        found = detect(row) if fmt == "auto" else fmt
        if found is None or not all(f in row for f in FORMATS[found][0]):
            raise no_schema_error(row, None if fmt == "auto" else fmt)
        kind = kind_of(found)
        if method_kind and kind not in COMPATIBLE.get(method_kind, {method_kind}):
            raise DataError(
                f"{row.get('_source', '?')}: {found} rows ({KIND_FIELDS[kind]}) do not fit "
                f"method={method_name}, which trains on {KIND_FIELDS.get(method_kind, method_kind)}. "
                "Pick a method for this data or map columns with data.columns"
            )
        formats[found] = formats.get(found, 0) + 1
        mapped.append(map_row(row, found, row.get("_source", "?")))
    if method_kind == "sft" and check_turns:
        check_assistant_turns(mapped, method_name)
    return mapped, empty, formats


def without_assistant_turn(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "messages" in r and not any(m["role"] == "assistant" for m in r["messages"])]


def check_assistant_turns(rows: list[dict], method_name: str) -> None:
    """SFT learns the assistant's turns only: a chat row without one has no target token."""
    bad = without_assistant_turn(rows)
    if bad:
        raise assistant_turns_error(len(bad), bad[:5], method_name)


def assistant_turns_error(n: int, first: list[dict], method_name: str) -> DataError:
    """The error for n chat rows without an assistant turn (`first`: the first five of them)."""
    where = ", ".join(str(r.get("_source", "?")) for r in first[:5]) + (" ..." if n > 5 else "")
    roles = sorted({m["role"] for m in first[0]["messages"]})
    return DataError(
        f"{n} chat row(s) have no assistant turn ({where}; roles found: {', '.join(roles)}): "
        f"method={method_name} trains on assistant replies only, so they give nothing to train on; "
        "add the assistant's reply (role 'assistant', or 'gpt' in ShareGPT) or remove those rows"
    )


def method_kind(method, cfg) -> str | None:
    """The kind of rows a method trains on: its `data_schema` attribute, else the kind of its
    embedded default rows (every method ships data of its own kind)."""
    kind = getattr(method, "data_schema", None)
    if kind:
        return kind
    try:
        sample = method.default_rows(cfg)[:1]
    except Exception:  # a method without usable defaults: accept any schema
        return None
    fmt = detect(sample[0]) if sample else None
    return kind_of(fmt) if fmt else None
