"""KTO: preference learning from unpaired good/bad completions (Kahneman–Tversky optimization).

Rows: {"prompt", "completion", "label": true|false} (text or chat, as for DPO), or preference pairs
{"prompt", "chosen", "rejected"}, each of which gives one good and one bad example.

With logratio = log π(y|x) − log π_ref(y|x) summed over completion tokens and z a batch estimate of
KL(π‖π_ref) (mean logratio of mismatched prompt/completion pairs, all-reduced over ranks, clamped
at 0, no gradient):
    good: w_good · (1 − σ(β (logratio − z)))       bad: w_bad · (1 − σ(β (z − logratio)))
Each example's mismatched partner (the completion of the next example of its split, in a seeded
order) is fixed at encoding, so reference log-probs can be precomputed for it too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from distft.contracts import Method, MethodContext
from distft.data.preference import (
    BadRow,
    Skips,
    as_messages,
    completion_ids,
    default_pairs,
    fit,
    pad_sequences,
    prompt_ids,
    render,
    split_pair,
)
from distft.errors import ConfigError
from distft.methods.logprobs import model_logps
from distft.methods.reference import (
    Reference,
    check_reference,
    held_out,
    map_examples,
    setup_reference,
    to_device,
)
from distft.parallel.cp import WHOLE
from distft.ranges import num
from distft.runtime import dist

KTO_FIELDS = "'prompt', 'completion' and a boolean 'label', or a preference pair 'prompt'/'chosen'/'rejected'"


@dataclass
class KTOConfig:
    name: str = "kto"
    """Method."""
    beta: float = num(0.1, gt=0)
    """KL coefficient (scale of the implicit reward)."""
    desirable_weight: float = num(1.0, gt=0)
    """Loss weight of good examples (raise it when they are rarer than bad ones)."""
    undesirable_weight: float = num(1.0, gt=0)
    """Loss weight of bad examples."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training (no reference model is kept)."""
    disable_dropout: bool = True
    """Turn dropout off in the policy, so policy and reference log-probs are comparable."""
    max_skip_fraction: float = num(0.05, ge=0, le=1)
    """Largest fraction of a split's rows that may be skipped before the run stops with an error."""


def _unpaired(row: dict) -> list[tuple[object, object, bool, int]]:
    """(prompt, completion, good?, pair index) items of a row (pair index is set by the caller)."""
    if "chosen" in row or "rejected" in row:
        prompt, chosen, rejected = split_pair(row)
        return [(prompt, chosen, True, 0), (prompt, rejected, False, 0)]
    if row.get("completion") in (None, "", []) or "label" not in row:
        found = sorted(k for k in row if not k.startswith("_"))
        raise BadRow(f"missing fields (found {found}; expected {KTO_FIELDS})")
    label = row["label"]
    if label not in (True, False, 0, 1):
        raise BadRow(f"'label' must be true or false, got {label!r}")
    prompt = row.get("prompt", "")
    completion = (
        as_messages(row["completion"], "completion") if isinstance(prompt, list) else row["completion"]
    )
    return [(prompt, completion, bool(label), -1)]


def encode_items(rows: list[dict], tokenizer, cfg, start: int = 0) -> tuple[list[dict], dict]:
    """The examples of rows that are rows start, start+1, ... of their split, without their KL
    partners (`link` adds them once the whole split is encoded), and the stats."""
    skips = Skips(cfg.method.max_skip_fraction, what="KTO")
    examples, truncated = [], 0
    for i, row in enumerate(rows, start):
        try:
            items = []
            for prompt, completion, good, paired in _unpaired(row):
                p_text, c_text, eos = render(prompt, completion, tokenizer)
                p, (c,), cut = fit(
                    prompt_ids(p_text, tokenizer),
                    [completion_ids(c_text, eos, tokenizer)],
                    cfg.data.max_length,
                )
                if not c:
                    raise BadRow(f"no completion tokens left within data.max_length={cfg.data.max_length}")
                items.append(
                    (
                        {
                            "prompt_ids": p,
                            "completion_ids": c,
                            "label": int(good),
                            "pair": i if paired == 0 else -1,
                        },
                        cut,
                    )
                )
        except BadRow as e:
            skips.add(row, str(e))
            continue
        for ex, cut in items:
            truncated += cut
            examples.append(ex)
    skips.check(len(rows))
    good = sum(e["label"] for e in examples)
    stats = {"truncated": truncated, "good": good, "bad": len(examples) - good, **skips.report()}
    return examples, stats


def kl_partners(n: int, seed: int) -> list[int]:
    """Each example's mismatched partner for the KL estimate: the next one in a seeded cycle over
    the split's n examples (depends on n and the seed only, so chunks can be linked later)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):
        partner[a] = b
    return partner


def link(examples, cfg, batch: int = 2000):
    """Batches of the split's examples with their `kl_ids` (the partner's completion, cut to fit
    after the example's prompt); `examples` may be a memory-mapped Rows (read by index)."""
    partner = kl_partners(len(examples), cfg.train.seed)
    for start in range(0, len(examples), batch):
        out = examples[start : start + batch]
        for a, ex in enumerate(out, start):
            room = cfg.data.max_length - len(ex["prompt_ids"])
            ex["kl_ids"] = examples[partner[a]]["completion_ids"][: max(room, 1)]
        yield out


def encode_unpaired(rows: list[dict], tokenizer, cfg) -> tuple[list[dict], dict]:
    examples, stats = encode_items(rows, tokenizer, cfg)
    return [ex for part in link(examples, cfg) for ex in part], stats


class KTO(Method):
    config = KTOConfig
    auto_class = None  # AutoModelForCausalLM
    scored_head = True  # log-probs project only the completions (distft.methods.logprobs)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.ref: Reference | None = None
        self.data = None  # the run's encoded splits (set in setup)

    @staticmethod
    def validate(cfg) -> None:
        m = cfg.method
        if m.beta <= 0:
            raise ConfigError(f"method.beta={m.beta} must be > 0")
        if m.desirable_weight <= 0 or m.undesirable_weight <= 0:
            raise ConfigError("method.desirable_weight and method.undesirable_weight must be > 0")
        if not 0 <= m.max_skip_fraction <= 1:
            raise ConfigError(f"method.max_skip_fraction={m.max_skip_fraction} must be in [0, 1]")
        check_reference(cfg, True)

    @staticmethod
    def default_rows(cfg) -> list[dict]:
        return default_pairs(cfg.data.num_examples)

    skip_what = "KTO"

    @staticmethod
    def encode(rows: list[dict], tokenizer, cfg, train: bool) -> tuple[list[dict], dict]:
        return encode_unpaired(rows, tokenizer, cfg)

    @staticmethod
    def encode_chunk(rows: list[dict], tokenizer, cfg, train: bool, start: int) -> tuple[list[dict], dict]:
        """Rows start.. of a split without KL partners (distft/data/encode.py encodes in chunks,
        then `link_split` pairs them across the whole split)."""
        return encode_items(rows, tokenizer, cfg, start)

    @staticmethod
    def link_split(examples, cfg):
        return link(examples, cfg)

    def collate(self, examples: list[dict]) -> dict:
        """B examples then their B mismatched (KL) rows; `num_targets` counts examples."""
        prompts = [e["prompt_ids"] for e in examples]
        batch = pad_sequences(
            prompts + prompts,
            [e["completion_ids"] for e in examples] + [e["kl_ids"] for e in examples],
            self.tokenizer.pad_token_id,
        )
        batch["good"] = torch.tensor([bool(e["label"]) for e in examples])
        batch["num_targets"] = len(examples)
        batch["num_tokens"] = int(batch["attention_mask"][: len(examples)].sum())
        if all("ref" in e for e in examples):
            batch["ref_logps"] = torch.tensor(
                [e["ref"] for e in examples] + [e["ref_kl"] for e in examples], dtype=torch.float64
            )
        # Under context parallelism the completion sums need whole rows, and each example stays
        # beside its KL partner on every rank of the group (distft.parallel.cp.WHOLE).
        batch[WHOLE] = True
        return batch

    def setup(self, ctx: MethodContext) -> None:
        self.data = ctx.data
        self.ref = setup_reference(ctx, self, _assign)

    def _logratios(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.ref.logps(batch)
        logps, _ = model_logps(model, batch, self.cfg.train.loss_chunks)
        n = batch["num_targets"]
        ratio = logps - ref
        return ratio[:n], ratio[n:].detach()

    def _kl(self, kl_ratios: torch.Tensor) -> torch.Tensor:
        total, count = dist.all_reduce_sum([float(kl_ratios.sum()), kl_ratios.numel()], kl_ratios.device)
        return torch.tensor(max(total / max(count, 1.0), 0.0), device=kl_ratios.device)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        m = self.cfg.method
        ratio, kl_ratios = self._logratios(model, batch)
        kl = self._kl(kl_ratios)
        good = batch["good"]
        loss = torch.where(
            good,
            m.desirable_weight * (1 - torch.sigmoid(m.beta * (ratio - kl))),
            m.undesirable_weight * (1 - torch.sigmoid(m.beta * (kl - ratio))),
        )
        rewards = m.beta * ratio.detach()
        n_good, n_bad = int(good.sum()), int((~good).sum())
        parts = {
            "kl": (float(kl), 1),
            "rewards/chosen": (float(rewards[good].sum()), n_good),
            "rewards/rejected": (float(rewards[~good].sum()), n_bad),
            "rewards/accuracy": (float(((rewards > 0) == good).sum()), rewards.numel()),
        }
        return loss.sum(), parts

    @torch.no_grad()
    def evaluate(self, model, rows: list[dict], info, sharded: bool) -> dict:
        """Held-out accuracy: for examples from pairs, chosen's reward above rejected's; for
        unpaired examples, the reward's sign matching the label. Margin: mean good minus mean bad
        reward."""
        examples = held_out(self, rows)
        was_training = model.training
        model.eval()

        def rewards(chunk: list[dict]) -> list:
            batch = to_device(self.collate(chunk), info.device)
            ratio, _ = self._logratios(model, batch)
            return (self.cfg.method.beta * ratio).tolist()

        values = map_examples(examples, rewards, info, self.cfg.train.micro_batch_size)
        model.train(was_training)
        if not values:
            return {}
        by_pair: dict[int, dict[int, float]] = {}
        hits = total = 0
        for ex, v in zip(examples, values):
            if ex["pair"] >= 0:
                by_pair.setdefault(ex["pair"], {})[ex["label"]] = v
            else:
                hits += (v > 0) == bool(ex["label"])
                total += 1
        for pair in by_pair.values():
            if len(pair) == 2:
                hits += pair[1] > pair[0]
                total += 1
        good = [v for ex, v in zip(examples, values) if ex["label"]]
        bad = [v for ex, v in zip(examples, values) if not ex["label"]]
        out = {"accuracy": hits / max(total, 1)}
        if good and bad:
            out["margin"] = sum(good) / len(good) - sum(bad) / len(bad)
        return out


def _assign(example: dict, row_logps: list[float]) -> None:
    example["ref"], example["ref_kl"] = row_logps
