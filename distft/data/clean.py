"""Cleaning before training, every step counted for the data report.

Order: Unicode NFKC + whitespace normalization → optional personal-data masking → removal of
empty, too-short, too-long and config-filtered rows → exact duplicates → near duplicates.

Whitespace: CRLF → LF, runs of spaces/tabs inside a line → one space (leading indentation is
kept, so code survives), no trailing spaces on a line, at most one blank line in a row, ends
trimmed. The prompt keeps its end and the completion its start: that boundary is what the model
learns (" Paris" after "Capital:" must stay " Paris").

Near duplicates (datasketch MinHash over character 5-grams, signatures computed by data.num_proc
workers and banded as datasketch's LSH bands them, default Jaccard ≥ 0.85 on the prompt) are
removed only when the answers also match (equal ignoring case and punctuation, or near-equal for
answers of 50+ characters) and every number in the rows is the same, so templated rows whose
answers differ ("What is 3 times 4?" → 12, "What is 3 times 5?" → 15) all survive.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import operator
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from distft.data.schemas import prompt_and_answer, required_texts
from distft.errors import ConfigError

EXAMPLES_PER_REASON = 20
SHINGLE = 5
NUM_PERM = 128
LONG_ANSWER = 50
PII_KINDS = ("email", "phone", "ip", "card")

_TRAILING = re.compile(r"[^\S\n]+\n")
_RUN = re.compile(r"(?<=\S)[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_LOOSE = re.compile(r"[\W_]+")
_NUMBER = re.compile(r"\d+")


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


# ---------------------------------------------------------------- result
@dataclass
class Cleaned:
    rows: list[dict]
    lengths: list[int] | None
    """Token lengths of the kept rows (when a length function was given)."""
    counts: dict[str, int]
    """loaded, empty, too_short, too_long, filtered, exact_duplicates, near_duplicates, kept, ..."""
    drops: dict[str, dict] = field(default_factory=dict)
    """reason → {"count": n, "examples": [{"where": ..., "detail": ...}, ...]}"""
    pii: dict[str, int] = field(default_factory=dict)
    normalized: int = 0
    conflicts: int = 0
    """Prompts that appear with different answers (kept; such rows stay in one split)."""
    first_words: list | None = None
    """First word of each kept row's completion (None: none), when computed batch by batch."""
    labels: list | None = None
    """Each kept row's label (str) when every kept row is a classification row, batch by batch."""

    def drop(self, reason: str, row: dict, detail: str = "") -> None:
        d = self.drops.setdefault(reason, {"count": 0, "examples": []})
        d["count"] += 1
        if len(d["examples"]) < EXAMPLES_PER_REASON:
            d["examples"].append({"where": row.get("_source", "?"), "detail": detail})


def loose(s: str) -> str:
    return _LOOSE.sub("", s.casefold())


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
        keep = near_duplicates(rows, c.near_dedup_threshold, res, getattr(c, "num_proc", 1))
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


def _shingles(text: str) -> list[bytes]:
    t = " ".join(text.casefold().split())
    if len(t) <= SHINGLE:
        return [t.encode()]
    return list({t[i : i + SHINGLE].encode() for i in range(len(t) - SHINGLE + 1)})


@functools.lru_cache(maxsize=8)
def lsh_params(threshold: float) -> tuple[int, int]:
    """datasketch's optimal (bands, rows) for the threshold: a numerical integration of ~0.15 s,
    done once per threshold, not once per index (streaming builds one index per block)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, NUM_PERM, 0.5, 0.5)


SIG_CHUNK = 5000  # rows per MinHash task of a worker


@functools.lru_cache(maxsize=1)
def _permutations():
    """datasketch's default scheme and permutations for NUM_PERM (seed 1)."""
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM)
    return m.scheme, m.permutations


SIG_SHINGLES = 1 << 16  # shingles permuted in one numpy step (x 128 x 4 bytes)
_DIGEST = operator.methodcaller("digest")


def _sha1_32(shingles: list[bytes]):
    """datasketch's sha1_hash32 of each shingle (the first 4 bytes of its SHA-1, little-endian),
    the loop in C (map) and the values read from the joined digests."""
    import numpy as np

    joined = b"".join(map(_DIGEST, map(hashlib.sha1, shingles)))
    return np.frombuffer(joined, dtype="<u4").reshape(-1, 5)[:, 0]


def _ascii_shingle_hashes(texts: list[str]):
    """Hashes of the 5-character shingles of ASCII texts longer than a shingle (with no NUL), and
    each text's count of shingles: the shingles are 40-bit integers cut from the texts' bytes by
    numpy, and each distinct one is hashed once (texts share most of theirs). Repeats within a
    text stay: the minimum does not change."""
    import numpy as np

    data = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    counts = lengths - SHINGLE + 1
    text_start = np.repeat(np.cumsum(lengths) - lengths, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    pos = np.arange(int(counts.sum()), dtype=np.int64) - first + text_start
    value = np.zeros(len(pos), dtype=np.uint64)
    for k in range(SHINGLE):
        value = (value << np.uint64(8)) | data[pos + k]
    distinct, which = np.unique(value, return_inverse=True)
    as_bytes = distinct.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - SHINGLE :]
    shingles = np.ascontiguousarray(as_bytes).view(f"S{SHINGLE}").ravel().tolist()  # no NUL to lose
    return _sha1_32(shingles)[which], counts


def _other(texts: list[str]):
    """Hashes of the shingles of any texts (`_shingles`, each text's distinct ones), and their counts."""
    import numpy as np

    shingles = [_shingles(t) for t in texts]
    counts = np.fromiter(map(len, shingles), dtype=np.int64, count=len(shingles))
    return _sha1_32([x for sh in shingles for x in sh]), counts


def _minimums(hashes, counts, out) -> None:
    """out[k] = the MinHash of text k, whose shingle hashes are the next counts[k] of `hashes`:
    datasketch's MurmurHash3 finalizer, affine permutations (uint32 arithmetic wraps, as
    datasketch's does) and the minimum, for SIG_SHINGLES shingles of many texts per step."""
    import numpy as np
    from datasketch.minhash import _fmix

    _, (a, b) = _permutations()
    a, b = a.astype(np.uint32).reshape(-1, 1), b.astype(np.uint32).reshape(-1, 1)
    mixed = _fmix(hashes, 32)
    ends = np.cumsum(counts)
    starts = ends - counts
    i = 0
    while i < len(counts):
        j = max(i + 1, int(np.searchsorted(ends, starts[i] + SIG_SHINGLES, side="right")))
        lo, hi = starts[i], ends[j - 1]
        permuted = a * mixed[lo:hi].reshape(1, -1) + b  # [128, shingles]
        out[i:j] = np.minimum.reduceat(permuted, starts[i:j] - lo, axis=1).T  # each text has >= 1
        i = j


def _signatures(texts: list[str]):
    """datasketch's MinHash hash values of each text's shingles, computed as MinHash.update_batch
    computes them (sha1_hash32, the MurmurHash3 finalizer, the affine permutations, the minimum)
    but for many texts per numpy step instead of one (a test compares them with MinHash.bulk)."""
    import numpy as np

    scheme, _ = _permutations()
    if scheme != "affine32":  # a datasketch whose default differs: its own bulk computation
        from datasketch import MinHash

        sigs = MinHash.bulk([_shingles(t) for t in texts], num_perm=NUM_PERM)
        return (
            np.stack([m.hashvalues for m in sigs]).astype(np.uint32)
            if sigs
            else np.zeros((0, NUM_PERM), np.uint32)
        )
    norm = [" ".join(t.casefold().split()) for t in texts]
    fast = np.fromiter(
        (len(t) > SHINGLE and t.isascii() and "\0" not in t for t in norm), dtype=bool, count=len(norm)
    )
    out = np.empty((len(texts), NUM_PERM), np.uint32)
    groups = ((np.flatnonzero(fast), norm, _ascii_shingle_hashes), (np.flatnonzero(~fast), texts, _other))
    for group, source, hashes_of in groups:
        if len(group):
            part = np.empty((len(group), NUM_PERM), np.uint32)
            _minimums(*hashes_of([source[i] for i in group]), part)
            out[group] = part
    return out


def signatures(texts: list[str], num_proc: int = 1):
    """MinHash signatures (datasketch, 128 permutations) as one uint32 array [n, 128]: its hash
    values are below 2**32, so this is exact and 4 bytes a value, computed in chunks by
    `num_proc` forked workers."""
    import multiprocessing as mp

    import numpy as np

    chunks = [texts[i : i + SIG_CHUNK] for i in range(0, len(texts), SIG_CHUNK)]
    if num_proc <= 1 or len(chunks) <= 1:
        parts = [_signatures(c) for c in chunks]
    else:
        with mp.get_context("fork").Pool(num_proc) as pool:
            parts = pool.map(_signatures, chunks)
    return np.concatenate(parts) if parts else np.zeros((0, NUM_PERM), np.uint32)


def band_hashes(sigs, bands: int, width: int):
    """A 64-bit hash of each LSH band of each signature, [n, bands] (datasketch's banding: band k
    is permutations [k*width, (k+1)*width)): rows that share a band share its hash."""
    import numpy as np

    mult = np.arange(1, width + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    out = np.empty((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(bands):
            out[:, k] = (sigs[:, k * width : (k + 1) * width].astype(np.uint64) * mult).sum(axis=1)
    return out


def _band_candidates(hashes) -> dict[int, set[int]]:
    """For each row, the earlier rows whose band hashes match in at least one band (a superset of
    the rows sharing a band; `near` checks the bands themselves). Buckets by sorting, so memory is
    a few arrays of n, not an index of n x bands byte keys."""
    import numpy as np

    cands: dict[int, set[int]] = {}
    for k in range(hashes.shape[1]):
        h = hashes[:, k]
        order = np.argsort(h, kind="stable")  # equal hashes keep row order
        hs = h[order]
        starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
        sizes = np.diff(np.r_[starts, len(hs)])
        for a, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            group = order[a : a + size].tolist()
            for m, i in enumerate(group[1:], 1):
                cands.setdefault(i, set()).update(group[:m])
    return cands


def near_duplicates(rows, threshold: float, res: Cleaned, num_proc: int = 1, hashes=None) -> list[int]:
    """Indices of rows to keep; later near-duplicates of an earlier kept row are dropped. The
    same decisions as querying a datasketch MinHashLSH of the kept rows row by row (a test checks
    it), at a memory of ~4 x 128 bytes a row. With `hashes` (the rows' band hashes, computed
    batch by batch: 8 bytes a band) `rows` is only read for candidate pairs (it may be
    memory-mapped), whose signatures are computed again."""
    from datasketch import MinHash

    bands, width = lsh_params(threshold)
    sigs: dict[int, object] | object
    if hashes is None:
        sigs = signatures([prompt_and_answer(r)[0] for r in rows], num_proc)
        hashes = band_hashes(sigs, bands, width)
    else:
        sigs = {}
    parts: dict[int, tuple[str, str, list, str]] = {}
    answer_sigs: dict[int, object] = {}

    def part(i: int) -> tuple[str, str, list, str]:
        """prompt, answer, numbers, loose answer of row i (rows of candidate pairs only)."""
        if i not in parts:
            p, a = prompt_and_answer(rows[i])
            parts[i] = (p, a, _NUMBER.findall(p + "\n" + a), loose(a))
        return parts[i]

    def sig(i: int):
        if isinstance(sigs, dict):
            if i not in sigs:
                sigs[i] = _signatures([part(i)[0]])[0]
            return sigs[i]
        return sigs[i]

    def answer_sig(i: int):
        if i not in answer_sigs:
            answer_sigs[i] = MinHash.bulk([_shingles(part(i)[1])], num_perm=NUM_PERM)[0]
        return answer_sigs[i]

    def same_answer(i: int, j: int) -> bool:
        (_, a_i, _, loose_i), (_, a_j, _, loose_j) = part(i), part(j)
        if loose_i == loose_j:
            return bool(loose_i) or a_i.strip() == a_j.strip()
        if min(len(loose_i), len(loose_j)) >= LONG_ANSWER:
            return answer_sig(i).jaccard(answer_sig(j)) >= threshold
        return False

    def near(i: int, j: int) -> bool:
        a, b = sig(i), sig(j)
        share = any(
            (a[k * width : (k + 1) * width] == b[k * width : (k + 1) * width]).all() for k in range(bands)
        )
        return share and part(i)[2] == part(j)[2] and same_answer(i, j) and (a == b).mean() >= threshold

    cands = _band_candidates(hashes)
    kept = [False] * len(hashes)
    keep = []
    for i in range(len(hashes)):
        match = [j for j in sorted(cands.get(i, ())) if kept[j] and near(i, j)]
        if match:
            res.drop("near_duplicate", rows[i], f"near {rows[match[0]].get('_source', '?')}")
            continue
        kept[i] = True
        keep.append(i)
    return keep


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
