"""Prompt data for RL methods: the embedded default task, encoding of prompt rows, and the eval.

A row is `prompt` (plain text) or `messages` (chat; the prompt is everything before the last
assistant turn). Other columns (e.g. `completion`, `answer`, `solution`) are passed to reward
functions. Rows with a reference answer also carry SFT tokens, so the engine's eval loss is the
reference answers' NLL under the policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distft.data.collate import pad_batch
from distft.data.default_tasks import sft_rows
from distft.data.sft_format import IGNORE, _chat, reference_answer, tokenize_sft
from distft.errors import DataError
from distft.runtime import dist

PROMPT_FIELDS = "'prompt' (text) or 'messages' (a list of {role, content})"
PROMPT_SEED = 7  # the default prompts differ from the default SFT job's examples (seed 0)


def default_rows(cfg) -> list[dict]:
    from distft.methods.rl.env import env_class

    env = env_class(cfg)
    if env is not None and hasattr(env, "default_rows"):  # the environment's own task
        return env.default_rows(cfg.method.num_prompts, PROMPT_SEED)
    rows = sft_rows(cfg.method.num_prompts, seed=PROMPT_SEED)
    for i, row in enumerate(rows):
        row["_source"] = f"<default {cfg.method.name} prompts>:{i + 1}"
    return rows


def warmup_rows(cfg, n: int, seed: int) -> list[dict]:
    """Rows of the SFT warm-up: the environment's demonstrations when it has them, else the
    default task's."""
    from distft.methods.rl.env import env_class

    env = env_class(cfg)
    if env is not None and hasattr(env, "warmup_rows"):
        return env.warmup_rows(n, seed)
    return sft_rows(n, seed=seed)


def prompt_of(row: dict, tokenizer) -> str:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise DataError(f"{row.get('_source', '?')}: 'messages' must be a list of {{role, content}}")
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        return _chat(tokenizer, msgs[: turns[-1]] if turns else msgs, generation_prompt=True)
    if "prompt" in row:
        return str(row["prompt"])
    found = sorted(k for k in row if not k.startswith("_"))
    raise DataError(
        f"{row.get('_source', '?')}: missing fields for RL prompts; found {found}, expected {PROMPT_FIELDS}"
    )


def has_reference(row: dict) -> bool:
    if "messages" in row:
        return any(m.get("role") == "assistant" for m in row["messages"])
    return "completion" in row


def columns_of(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def encode(rows: list[dict], tokenizer, cfg, train: bool) -> tuple[list[dict], dict]:
    limit = cfg.data.max_length - cfg.method.max_new_tokens
    examples, too_long, no_reference = [], 0, 0
    for row in rows:
        prompt = prompt_of(row, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(prompt_ids) > limit:
            too_long += 1
            continue
        if has_reference(row):
            sft = tokenize_sft(row, tokenizer, cfg.data.max_length, train_on_prompt=False)
            ids, labels = sft.input_ids, sft.labels
        elif train:
            ids, labels = prompt_ids, [IGNORE] * len(prompt_ids)
        else:  # held-out rows without a reference add nothing to the eval loss
            no_reference += 1
            continue
        examples.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": list(range(len(ids))),
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "columns": columns_of(row),
            }
        )
    stats = {"dropped_prompt_too_long": too_long, "no_reference": no_reference}
    if too_long and not examples:
        raise DataError(
            f"every prompt is longer than data.max_length - method.max_new_tokens = {limit} tokens; "
            "raise data.max_length"
        )
    return examples, stats


def collate(examples: list[dict], pad_id: int) -> dict:
    return pad_batch(examples, pad_id)


def reference_nll(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed NLL of the reference answers (the engine's eval loss for RL methods)."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, {}


def evaluate(model, tokenizer, scorer, rows: list[dict], cfg, info, sharded: bool) -> dict:
    """On held-out prompts, sharded over ranks: `reward`, the mean reward of completions sampled as
    in training (what RL maximizes; a fixed seed, so evals compare, and the training RNG stream is
    left as it was), and `reward_greedy` / `exact_match` of greedy completions."""
    from distft.methods.rl.env import run_episodes
    from distft.methods.rl.rollout import generate_rollouts

    rows = rows[: cfg.data.max_eval_generations]
    if not rows:
        return {}
    mine = rows[info.rank :: info.world_size] or rows[:1]
    weight = 1.0 if rows[info.rank :: info.world_size] else 0.0  # a rank with no rows ran a dummy
    prompts = [prompt_of(r, tokenizer) for r in mine]
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    columns = [columns_of(r) for r in mine]
    sums = []
    devices = [info.device] if info.device.type == "cuda" else []  # RNG states fork_rng restores
    for greedy in (False, True):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.train.seed + info.rank)
            if cfg.method.env:
                ep = run_episodes(model, tokenizer, columns, cfg, info.device, sharded, greedy=greedy)
                roll, env_rewards = ep.rollouts, ep.rewards
            else:
                roll = generate_rollouts(
                    model, tokenizer, prompts, ids, cfg, info.device, sharded, greedy=greedy
                )
                env_rewards = None
        scores = scorer(
            roll.prompts, roll.completions, roll.completion_ids, roll.stopped, columns, env_rewards
        )
        sums += [weight * float(scores.valid.sum()), weight * float(scores.total.sum())]
    refs = [(i, reference_answer(r)) for i, r in enumerate(mine) if has_reference(r)]
    hits = sum(roll.completions[i].strip() == str(a).strip() for i, a in refs)  # greedy
    n_sampled, sampled, n_greedy, greedy_total, hits, n_refs = dist.all_reduce_sum(
        [*sums, weight * hits, weight * len(refs)], info.device
    )
    out = {"reward": sampled / max(n_sampled, 1.0), "reward_greedy": greedy_total / max(n_greedy, 1.0)}
    if n_refs:
        out["exact_match"] = hits / n_refs
    return out
