"""Near duplicates: datasketch MinHash signatures over character 5-grams of the prompt, computed
for many texts per numpy step (the same values as datasketch's), banded as datasketch's LSH bands
them, and the decisions of querying a datasketch MinHashLSH of the kept rows (distft/data/clean.py
describes what counts as a near duplicate)."""

from __future__ import annotations

import functools
import hashlib
import operator
import re

from distft.data import workers
from distft.data.cleaned import Cleaned
from distft.data.schemas import prompt_and_answer

_LOOSE = re.compile(r"[\W_]+")
_NUMBER = re.compile(r"\d+")


def loose(s: str) -> str:
    """Text without case, punctuation or spaces: answers equal up to those count as the same."""
    return _LOOSE.sub("", s.casefold())


SHINGLE = 5
NUM_PERM = 128
LONG_ANSWER = 50


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


SIG_SHINGLES = 1 << 14  # shingles permuted in one numpy step, in one reused buffer of 128 x them x 4 bytes
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
    datasketch's does) and the minimum, for SIG_SHINGLES shingles of many texts per step. The
    steps permute in place in one buffer (8 MB): fresh arrays of this size are mapped and faulted
    in by the allocator at every step, which cost 3x the arithmetic."""
    import numpy as np
    from datasketch.minhash import _fmix

    _, (a, b) = _permutations()
    a, b = a.astype(np.uint32).reshape(-1, 1), b.astype(np.uint32).reshape(-1, 1)
    mixed = _fmix(hashes, 32)
    ends = np.cumsum(counts)
    starts = ends - counts
    buf = np.empty((len(a), SIG_SHINGLES), np.uint32)
    i = 0
    while i < len(counts):
        j = max(i + 1, int(np.searchsorted(ends, starts[i] + SIG_SHINGLES, side="right")))
        lo, hi = starts[i], ends[j - 1]
        if hi - lo > buf.shape[1]:  # one text longer than a step
            buf = np.empty((len(a), hi - lo), np.uint32)
        permuted = buf[:, : hi - lo]  # [128, shingles]
        np.multiply(a, mixed[lo:hi].reshape(1, -1), out=permuted)
        permuted += b
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
    import numpy as np

    chunks = [texts[i : i + SIG_CHUNK] for i in range(0, len(texts), SIG_CHUNK)]
    if num_proc <= 1 or len(chunks) <= 1:
        parts = [_signatures(c) for c in chunks]
    else:
        with workers.forked_pool(num_proc) as pool:
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
