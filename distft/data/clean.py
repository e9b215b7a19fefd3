"""Cleaning before training, every step counted for the data report.

Order: Unicode NFKC + whitespace normalization → optional personal-data masking → removal of
empty, too-short, too-long and config-filtered rows → exact duplicates → near duplicates.

Whitespace: CRLF → LF, runs of spaces/tabs inside a line → one space (leading indentation is
kept, so code survives), no trailing spaces on a line, at most one blank line in a row, ends
trimmed. The prompt keeps its end and the completion its start: that boundary is what the model
learns (" Paris" after "Capital:" must stay " Paris").

Near duplicates (distft/data/near_dedup.py: datasketch MinHash over character 5-grams,
signatures computed by data.num_proc workers and banded as datasketch's LSH bands them, default
Jaccard ≥ 0.85 on the prompt) are removed only when the answers also match (equal ignoring case
and punctuation, or near-equal for answers of 50+ characters) and every number in the rows is the
same, so templated rows whose answers differ ("What is 3 times 4?" → 12, "What is 3 times 5?" →
15) all survive.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable

from distft.data import workers
from distft.data.cleaned import Cleaned
from distft.data.schemas import prompt_and_answer, required_texts
from distft.errors import ConfigError

PII_KINDS = ("email", "phone", "ip", "card")

_TRAILING = re.compile(r"[^\S\n]+\n")
_RUN = re.compile(r"(?<=\S)[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(
    s: str, unicode: bool = True, whitespace: bool = True, strip_start: bool = True, strip_end: bool = True
) -> str:
    if unicode:
        s = unicodedata.normalize("NFKC", s)
    if whitespace:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
        s = _TRAILING.sub("\n", s)
        s = _RUN.sub(" ", s)
        s = _BLANK_LINES.sub("\n\n", s)
        if strip_start:
            s = s.lstrip()
        if strip_end:
            s = s.rstrip()
    return s


# Which end of a field may be trimmed: (start, end). The prompt/completion boundary is kept.
SIDES = {
    "prompt": (True, False),
    "completion": (False, True),
    "chosen": (False, True),
    "rejected": (False, True),
}


def map_texts(row: dict, fn: Callable[[str, bool, bool], str]) -> dict:
    """Apply fn(text, strip_start, strip_end) to every canonical text field of a row."""
    out = dict(row)
    for key in ("prompt", "completion", "chosen", "rejected", "text", "messages"):
        if key not in out:
            continue
        v = out[key]
        if isinstance(v, list):
            out[key] = [
                dict(m, content=fn(m["content"], True, True)) if isinstance(m, dict) and "content" in m else m
                for m in v
            ]
        elif isinstance(v, str):
            start, end = SIDES.get(key, (True, True))
            out[key] = fn(v, start, end)
    if isinstance(out.get("label"), str):
        out["label"] = out["label"].strip()
    return out


# ---------------------------------------------------------------- personal data
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _is_ip(m: re.Match) -> bool:
    try:
        ipaddress.ip_address(m.group())
    except ValueError:
        return False
    return True


def _sub(pattern: re.Pattern, text: str, token: str, check=None) -> tuple[str, int]:
    n = 0

    def repl(m: re.Match) -> str:
        nonlocal n
        if check is not None and not check(m):
            return m.group()
        n += 1
        return token

    return pattern.sub(repl, text), n


def _phones(text: str, region: str) -> tuple[str, int]:
    import phonenumbers

    spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)]
    for start, end in reversed(spans):
        text = text[:start] + "[PHONE]" + text[end:]
    return text, len(spans)


def mask_pii(text: str, kinds: list[str], region: str = "US") -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses, card numbers (Luhn-valid), IP addresses and phone numbers
    (libphonenumber) by [EMAIL] [CARD] [IP] [PHONE]; returns the text and counts per kind."""
    counts = {}
    if "email" in kinds:
        text, counts["email"] = _sub(_EMAIL, text, "[EMAIL]")
    if "card" in kinds:
        text, counts["card"] = _sub(_CARD, text, "[CARD]", _is_card)
    if "ip" in kinds:
        text, n4 = _sub(_IPV4, text, "[IP]", _is_ip)
        text, n6 = _sub(_IPV6, text, "[IP]", _is_ip)
        counts["ip"] = n4 + n6
    if "phone" in kinds:
        text, counts["phone"] = _phones(text, region)
    return text, counts


def content_key(row: dict) -> str:
    """Exact-duplicate key: the canonical content only (not ids or other pass-through fields)."""
    import json

    keys = ("prompt", "completion", "messages", "chosen", "rejected", "text", "label")
    return json.dumps([row.get(k) for k in keys], ensure_ascii=False, sort_keys=True)


def clean(
    rows: list[dict],
    data_cfg,
    lengths_of: Callable[[list[dict]], list[int]] | None = None,
    max_tokens: int | None = None,
    empty: list[dict] = (),
) -> Cleaned:
    """Clean canonical rows as data_cfg says. `lengths_of` gives token lengths (for the
    overlong=drop filter and the report); `max_tokens` is the limit for overlong rows; `empty`
    are rows without any content (set aside by schema mapping), counted as empty."""
    c = data_cfg
    res = Cleaned([], None, {"loaded": len(rows) + len(empty)})
    for row in empty:
        res.drop("empty", row, "no content")
    rows = _normalize(rows, c, res)  # 1. unicode and whitespace
    if c.pii_mask:  # 2. personal data
        rows = _mask_pii(rows, c, res)
    rows = _filter(rows, c, res)  # 3. empty, too short, too long, config filters
    lengths = lengths_of(rows) if lengths_of is not None else None
    if lengths is not None and c.overlong == "drop" and max_tokens:
        rows, lengths = _drop_overlong(rows, lengths, max_tokens, res)
    if c.dedup:  # 4. exact duplicates (first occurrence wins)
        rows, lengths = _take(rows, lengths, _exact_duplicates(rows, res))
    if c.near_dedup and c.near_dedup_threshold > 0 and len(rows) > 1:  # 5. near duplicates
        from distft.data.near_dedup import near_duplicates

        keep = near_duplicates(rows, c.near_dedup_threshold, res, workers.count(c))
        rows, lengths = _take(rows, lengths, keep)
    res.conflicts = _conflicts(rows)
    res.rows, res.lengths = rows, lengths
    for reason in ("empty", "too_short", "too_long", "filtered", "exact_duplicate", "near_duplicate"):
        res.counts[reason] = res.drops.get(reason, {}).get("count", 0)
    res.counts["duplicates_removed"] = res.counts["exact_duplicate"] + res.counts["near_duplicate"]
    res.counts["kept"] = len(rows)
    return res


def _normalize(rows: list[dict], c, res: Cleaned) -> list[dict]:
    if not (c.normalize_unicode or c.normalize_whitespace):
        return rows

    def norm(s: str, start: bool, end: bool) -> str:
        return normalize_text(s, c.normalize_unicode, c.normalize_whitespace, start, end)

    out = []
    for row in rows:
        new = map_texts(row, norm)
        res.normalized += new != row
        out.append(new)
    return out


def _mask_pii(rows: list[dict], c, res: Cleaned) -> list[dict]:
    pii = dict.fromkeys(c.pii_kinds, 0)

    def mask(s: str, start: bool, end: bool) -> str:
        s, counts = mask_pii(s, c.pii_kinds, c.pii_phone_region)
        for k, n in counts.items():
            pii[k] += n
        return s

    out = [map_texts(row, mask) for row in rows]
    res.pii = pii
    return out


def _filter(rows: list[dict], c, res: Cleaned) -> list[dict]:
    patterns = [re.compile(p) for p in c.drop_patterns]
    kept = []
    for row in rows:
        if any(not t.strip() for t in required_texts(row)):
            res.drop("empty", row, "a required field is blank")
            continue
        prompt, answer = prompt_and_answer(row)
        n_chars = len(prompt) + len(answer)
        if n_chars < c.min_chars:
            res.drop("too_short", row, f"{n_chars} chars < data.min_chars={c.min_chars}")
            continue
        if c.max_chars and n_chars > c.max_chars:
            res.drop("too_long", row, f"{n_chars} chars > data.max_chars={c.max_chars}")
            continue
        hit = next((p.pattern for p in patterns if p.search(prompt) or p.search(answer)), None)
        if hit is not None:
            res.drop("filtered", row, f"matches data.drop_patterns {hit!r}")
            continue
        kept.append(row)
    return kept


def _drop_overlong(rows: list[dict], lengths: list[int], max_tokens: int, res: Cleaned) -> tuple[list, list]:
    kept, kept_len = [], []
    for row, n in zip(rows, lengths):
        if n > max_tokens:
            res.drop("too_long", row, f"{n} tokens > data.max_length={max_tokens}")
            continue
        kept.append(row)
        kept_len.append(n)
    return kept, kept_len


def _exact_duplicates(rows: list[dict], res: Cleaned) -> list[int]:
    """Indices to keep: the first occurrence of each content."""
    seen: dict[str, str] = {}
    keep = []
    for i, row in enumerate(rows):
        key = content_key(row)
        if key in seen:
            res.drop("exact_duplicate", row, f"same as {seen[key]}")
            continue
        seen[key] = row.get("_source", "?")
        keep.append(i)
    return keep


def _take(rows: list, lengths: list | None, keep: list[int]) -> tuple[list, list | None]:
    return [rows[i] for i in keep], None if lengths is None else [lengths[i] for i in keep]


def _conflicts(rows: list[dict]) -> int:
    answers: dict[str, set] = {}
    for r in rows:
        p, a = prompt_and_answer(r)
        answers.setdefault(p, set()).add(a)
    return sum(len(v) > 1 for v in answers.values())


def check_config(c) -> None:
    """data.* cleaning keys (called by distft.config.load.validate)."""
    if c.overlong not in ("truncate", "drop"):
        raise ConfigError(f"data.overlong={c.overlong!r}; valid: truncate, drop")
    if c.bad_lines not in ("skip", "error"):
        raise ConfigError(f"data.bad_lines={c.bad_lines!r}; valid: skip, error")
    if not 0.0 <= c.near_dedup_threshold <= 1.0:
        raise ConfigError(f"data.near_dedup_threshold={c.near_dedup_threshold}; give a Jaccard in [0, 1]")
    unknown = sorted(set(c.pii_kinds) - set(PII_KINDS))
    if unknown:
        raise ConfigError(f"data.pii_kinds has {unknown}; valid: {', '.join(PII_KINDS)}")
    for p in c.drop_patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"data.drop_patterns: {p!r} is not a valid regular expression ({e})") from None
