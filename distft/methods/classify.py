"""Sequence classification: text → label through a classification head on the LM backbone
(`AutoModelForSequenceClassification`: the last real token's hidden state → one logit per label).

Works with every tuning mode that trains the head: full, LoRA/QLoRA/DoRA/IA3/prefix (PEFT's
SEQ_CLS task type trains and saves the new head as `modules_to_save`). The label order
(id2label/label2id) is fixed before the model is built and goes into the model config, so a full
export's config.json and an adapter export's distft_export.json carry it.

Embedded default data: is a word of 3-6 distinct letters in ascending, descending or mixed order?
(a balanced 3-class task the tiny model learns from scratch in the default job).
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from distft.contracts import Method
from distft.errors import ConfigError, DataError
from distft.eval import CLASSIFICATION_METRICS
from distft.eval.classification import check_known_labels, classification_metrics
from distft.runtime import dist

DEFAULT_LABELS = ("ascending", "descending", "mixed")


@dataclass
class ClassifyConfig:
    name: str = "classify"
    """Method."""
    labels: list[str] = field(default_factory=list)
    """Label names in head order. Empty: the base model's own id2label when it has named labels
    (continuing from a classify export), else the sorted labels of the train split."""
    average: Literal["macro", "weighted", "micro"] = "macro"
    """How precision, recall and F1 average over classes: macro, weighted or micro."""


def default_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = DEFAULT_LABELS[i % 3]
        letters = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
        if label == "ascending":
            letters.sort()
        elif label == "descending":
            letters.sort(reverse=True)
        else:
            while letters in (sorted(letters), sorted(letters, reverse=True)):
                rng.shuffle(letters)
        rows.append({"text": "".join(letters), "label": label, "_source": f"<default classify data>:{i + 1}"})
    rng.shuffle(rows)
    return rows


def _label(row: dict) -> str:
    return str(row["label"]).strip()


class _SequenceClassificationAuto:
    """`Classify.auto_class` on the class: the plain transformers auto class, resolved on first use
    (importing it is slow). Instances use a `LabelledHead` that knows the label mapping."""

    def __get__(self, obj, owner):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification


class LabelledHead:
    """`from_pretrained` for a sequence classifier with our label mapping in its config; used by the
    engine to build the model and by the export to rebuild it."""

    def __init__(self, method: Classify):
        self.method = method

    def from_pretrained(self, path, **kwargs):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        trust = kwargs.get("trust_remote_code", False)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        old = config.num_labels if getattr(config, "id2label", None) else None
        config.update(self.method.head_config())
        # A base that is itself a classifier with another label count gets a fresh head.
        mismatched = old is not None and old != config.num_labels and self.method.base_is_classifier
        return AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=mismatched, **kwargs
        )


class Classify(Method):
    config = ClassifyConfig
    auto_class = _SequenceClassificationAuto()
    data_schema = "classification"  # the rows it trains on: {"text", "label"}
    encode_chunks = True  # each row encodes alone (distft/data/encode.py encodes in chunks)
    eval_metrics = CLASSIFICATION_METRICS

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.label2id: dict[str, int] = {}
        self.base_is_classifier = False
        self.auto_class = LabelledHead(self)

    @staticmethod
    def validate(cfg) -> None:
        m = cfg.method
        if len(set(m.labels)) != len(m.labels):
            raise ConfigError(f"method.labels={m.labels} has duplicates; list each label once")
        if cfg.data.packing:
            raise ConfigError(
                "data.packing=true does not apply to method=classify (one label per sequence); "
                "set data.packing=false"
            )

    @staticmethod
    def default_rows(cfg) -> list[dict]:
        return default_rows(cfg.data.num_examples)

    @staticmethod
    def encode(rows: list[dict], tokenizer, cfg, train: bool) -> tuple[list[dict], dict]:
        examples, truncated, dropped = [], 0, 0
        for row in rows:
            if "text" not in row or "label" not in row:
                found = sorted(k for k in row if not k.startswith("_"))
                raise DataError(
                    f"{row.get('_source', '?')}: method=classify needs 'text' and 'label' fields; "
                    f"found {found}"
                )
            ids = tokenizer(str(row["text"]), add_special_tokens=True)["input_ids"]
            if not ids:
                dropped += 1
                continue
            if len(ids) > cfg.data.max_length:
                ids = ids[: cfg.data.max_length]
                truncated += 1
            examples.append({"input_ids": ids, "label": _label(row), "_source": row.get("_source", "?")})
        lengths = sorted(len(ex["input_ids"]) for ex in examples) or [0]
        stats = {
            "truncated": truncated,
            "dropped_empty": dropped,
            "tokens_p50": lengths[len(lengths) // 2],
            "tokens_max": lengths[-1],
            "labels": dict(sorted(Counter(ex["label"] for ex in examples).items())),
        }
        return examples, stats

    # -- the head: label order fixed from config, base model or train split, checked against val/test
    def on_data(self, data) -> None:
        """Fix the label order before the model is built; stop on labels training never saw."""
        base = self._base_labels()
        self.base_is_classifier = bool(base)
        names = list(self.cfg.method.labels) or base or sorted({ex["label"] for ex in data.train})
        self.label2id = {name: i for i, name in enumerate(names)}
        seen = {ex["label"] for ex in data.train}
        for split, examples in (("train", data.train), ("val", data.val), ("test", data.test)):
            allowed = self.label2id if split == "train" else seen & set(self.label2id)
            bad = [ex for ex in examples if ex["label"] not in allowed]
            if bad:
                where = "method.labels / the base model's labels" if split == "train" else "training"
                raise DataError(
                    f"labels unseen in {where}: {sorted({ex['label'] for ex in bad})} in the {split} split "
                    f"(first at {bad[0]['_source']}); known labels: {sorted(allowed)}. Add training rows "
                    "for them, drop those rows, or list them in method.labels"
                )

    def head_config(self) -> dict:
        """Model config keys for the head: its size, label names and the pad id (which the model
        uses to find each sequence's last real token)."""
        names = sorted(self.label2id, key=self.label2id.get)
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": dict(self.label2id),
            "pad_token_id": self.tokenizer.pad_token_id,
            "problem_type": "single_label_classification",
        }

    def export_meta(self) -> dict:
        """Saved in distft_export.json (an adapter export has no model config of its own)."""
        return {"id2label": {str(i): n for i, n in enumerate(sorted(self.label2id, key=self.label2id.get))}}

    def _base_labels(self) -> list[str]:
        """id2label of a base that is itself a classifier (continual learning from a classify export)."""
        if not self.cfg.model.name_or_path:
            return []
        from transformers import AutoConfig

        try:
            conf = AutoConfig.from_pretrained(
                self.cfg.model.name_or_path, trust_remote_code=self.cfg.model.trust_remote_code
            )
        except OSError:
            return []
        names = [str(conf.id2label[i]) for i in sorted(conf.id2label or {})]
        return [] if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names

    def collate(self, examples: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        width = max(len(ex["input_ids"]) for ex in examples)
        ids = [ex["input_ids"] + [pad] * (width - len(ex["input_ids"])) for ex in examples]
        mask = [[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"])) for ex in examples]
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "position_ids": torch.arange(width).expand(len(examples), width).contiguous(),
            "labels": torch.tensor([self.label2id[ex["label"]] for ex in examples]),
            "num_targets": len(examples),
            "num_tokens": sum(len(ex["input_ids"]) for ex in examples),
        }

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Summed cross-entropy over the batch's sequences, and accuracy as (correct, count)."""
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
        logits = out.logits.float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return loss, {"accuracy": (correct.detach(), len(batch["labels"]))}

    @torch.no_grad()
    def predict(self, model, examples: list[dict], info, sharded: bool) -> tuple[list[int], list[int]]:
        """(predicted ids, true ids) over all ranks' shares of `examples`."""
        mine = examples[info.rank :: info.world_size]
        micro = self.cfg.train.micro_batch_size
        n_batches = math.ceil(math.ceil(len(examples) / info.world_size) / micro)
        was_training = model.training
        model.eval()
        preds: list[int] = []
        try:
            for b in range(n_batches):
                rows = mine[b * micro : (b + 1) * micro]
                # Sharded weights need every rank in every forward: idle ranks run a dummy batch.
                batch = self.collate(rows or examples[:1])
                out = model(
                    input_ids=batch["input_ids"].to(info.device),
                    attention_mask=batch["attention_mask"].to(info.device),
                    position_ids=batch["position_ids"].to(info.device),
                )
                if rows:
                    preds += out.logits.argmax(-1).tolist()
        finally:
            model.train(was_training)
        truth = [self.label2id[ex["label"]] for ex in mine]
        gathered = dist.all_gather_objects((preds, truth))
        return [p for g in gathered for p in g[0]], [t for g in gathered for t in g[1]]

    def evaluate(self, model, rows: list[dict], info, sharded: bool) -> dict:
        """eval.metrics (default: accuracy, precision, recall, F1 by scikit-learn) on held-out rows."""
        if not rows:
            return {}
        examples, _ = self.encode(rows, self.tokenizer, self.cfg, train=False)
        check_known_labels([ex["label"] for ex in examples], list(self.label2id), "evaluation")
        if not examples:
            return {}
        preds, truth = self.predict(model, examples, info, sharded)
        names = tuple(getattr(getattr(self.cfg, "eval", None), "metrics", None) or CLASSIFICATION_METRICS)
        return classification_metrics(
            truth, preds, list(range(len(self.label2id))), self.cfg.method.average, names
        )
