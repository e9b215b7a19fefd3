"""What DAPO adds around rollout collection: overlong reward shaping and dynamic sampling.

- Overlong shaping (`method.overlong_buffer` = L_cache tokens > 0): completions longer than
  max_new_tokens − L_cache get a linear penalty reaching −`overlong_penalty` at max_new_tokens
  (DAPO eq. 13, TRL's `get_soft_overlong_punishment`), added to the reward and logged as
  `rewards/overlong`.
- Dynamic sampling (`method.dynamic_sampling`): groups whose valid rewards are all equal carry
  no advantage; they are dropped and refilled with groups of freshly drawn prompts, for at most
  `method.max_refills` more generation rounds (every rank runs the same number, as sharded
  generation needs). Groups still missing after that are filled back from the dropped ones (zero
  advantage). Refill prompts are a seeded draw of the whole train split per (step, round), each
  rank taking its contiguous share, so they do not depend on the world size.
"""

from __future__ import annotations

import dataclasses

import torch
from trl.rewards import get_soft_overlong_punishment

from distft.methods.rl import loop
from distft.methods.rl.rewards import Scores
from distft.runtime import dist

REFILL_SEED = 7919


def shape_overlong(scores: Scores, completion_ids: list[list[int]], m) -> None:
    """Add DAPO's soft overlong punishment to the valid rewards (in place)."""
    if m.overlong_buffer <= 0:
        return
    punish = get_soft_overlong_punishment(m.max_new_tokens, m.overlong_buffer)
    pen = torch.tensor(punish(completion_ids), dtype=scores.total.dtype) * m.overlong_penalty
    scores.total += pen * scores.valid.to(pen.dtype)
    scores.per_func["overlong"] = pen.double()


def informative_groups(scores: Scores, group: int) -> torch.Tensor:
    """[groups] True where at least two valid rewards of the group differ."""
    r = scores.total.view(-1, group).double()
    v = scores.valid.view(-1, group)
    hi = torch.where(v, r, torch.full_like(r, -torch.inf)).max(1).values
    lo = torch.where(v, r, torch.full_like(r, torch.inf)).min(1).values
    return (v.sum(1) >= 2) & (hi - lo > 1e-9)


def _rows(x, idx: list[int]):
    if torch.is_tensor(x):
        return x[idx]
    if isinstance(x, list):
        return [x[i] for i in idx]
    if isinstance(x, dict):
        return {k: _rows(v, idx) for k, v in x.items()}
    return x


def _cat(xs: list, pad: int):
    first = xs[0]
    if torch.is_tensor(first):
        if first.dim() >= 2:  # token tensors: right-pad to the widest
            width = max(x.shape[1] for x in xs)
            xs = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad) for x in xs]
        return torch.cat(xs)
    if isinstance(first, list):
        return [v for x in xs for v in x]
    if isinstance(first, dict):
        return {k: _cat([x[k] for x in xs], pad) for k in first}
    return sum(xs) if isinstance(first, int) and not isinstance(first, bool) else first


def select(obj, idx: list[int], pad: int = 0):
    """Rows `idx` of a Rollouts or Scores (every per-row field; counters are kept)."""
    values = {f.name: _rows(getattr(obj, f.name), idx) for f in dataclasses.fields(obj)}
    return dataclasses.replace(obj, **values)


def concat(objs: list, pad_id: int):
    """Rollouts or Scores stacked row-wise; token tensors right-padded (input_ids with pad_id)."""
    values = {}
    for f in dataclasses.fields(objs[0]):
        pad = pad_id if f.name == "input_ids" else 0
        values[f.name] = _cat([getattr(o, f.name) for o in objs], pad)
    return dataclasses.replace(objs[0], **values)


def refill_examples(ctx, step: int, round_: int, n: int) -> list[dict]:
    """This rank's `n` refill prompts of round `round_` of `step` (a seeded global draw)."""
    cfg, info = ctx.cfg, ctx.info
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000003 + step * REFILL_SEED + round_)
    perm = torch.randperm(len(ctx.data.train), generator=gen)
    ids = [int(perm[i % len(perm)]) for i in range(info.rank * n, info.rank * n + n)]
    return [ctx.data.train[i] for i in ids]


def collect(ctx, scorer, failures, examples: list[dict], micro: int, step: int) -> tuple[loop.Batch, dict]:
    """The step's scored rollouts (num_generations per prompt, grouped), shaped and, with dynamic
    sampling, filtered and refilled; and its metrics (`reward_failures`: rollouts skipped because
    a reward failed, counted against `failures`, a loop.FailureBudget)."""
    m, dev, pad = ctx.cfg.method, ctx.info.device, ctx.tokenizer.pad_token_id
    G = m.num_generations
    skipped = 0

    def one_round(exs: list[dict]) -> loop.Batch:
        nonlocal skipped
        b = loop.rollout_batch(ctx, scorer, exs, copies=G, micro=micro)
        skipped += failures.add(scorer, b.scores.failures, dev)
        shape_overlong(b.scores, b.rollouts.completion_ids, m)
        return b

    first = one_round(examples)
    if not m.dynamic_sampling:
        return first, {"reward_failures": skipped}
    need = len(examples)
    kept: list[tuple[loop.Batch, list[int]]] = []
    dropped: list[tuple[loop.Batch, list[int]]] = []
    n_kept = n_dropped = 0
    batch, rounds = first, 0
    while True:
        ok = informative_groups(batch.scores, G).tolist()
        good = [g for g, o in enumerate(ok) if o][: need - n_kept]
        bad = [g for g, o in enumerate(ok) if not o]
        kept.append((batch, good))
        dropped.append((batch, bad))
        n_kept += len(good)
        n_dropped += len(bad)
        (short,) = dist.all_reduce_sum([float(n_kept < need)], dev)
        if short == 0 or rounds >= m.max_refills:
            break
        rounds += 1
        batch = one_round(refill_examples(ctx, step, rounds, need))
    # Still short after max_refills: fill back with dropped groups (zero advantage, KL only).
    for b, bad in dropped:
        take = bad[: need - n_kept]
        kept.append((b, take))
        n_kept += len(take)
    parts = [(b, [g * G + j for g in groups for j in range(G)]) for b, groups in kept if groups]
    roll = concat([select(b.rollouts, rows) for b, rows in parts], pad)
    scores = concat([select(b.scores, rows) for b, rows in parts], pad)
    stats = dist.all_reduce_sum([float(n_dropped), float(rounds), float(len(examples) * (rounds + 1))], dev)
    metrics = {
        "reward_failures": skipped,
        "dynamic_sampling/dropped_groups": stats[0],
        "dynamic_sampling/refill_rounds": stats[1] / ctx.geometry.dp,
        "dynamic_sampling/dropped_frac": stats[0] / max(stats[2], 1.0),
    }
    return loop.Batch(roll, scores, micro * G), metrics
