"""Supervised fine-tuning: next-token loss on completion tokens (and EOS), summed per token; the
output head runs on those scored positions only (distft.methods.logprobs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distft.contracts import Method
from distft.data import vision
from distft.data.collate import as_row, pack, pad_batch
from distft.data.default_tasks import sft_rows
from distft.data.sft_format import IGNORE, tokenize_sft_batch
from distft.eval import GENERATION_METRICS
from distft.eval.generation import generation_metrics
from distft.eval.vision import generation_metrics as vision_generation_metrics
from distft.methods.logprobs import model_nll
from distft.models import vlm


@dataclass
class SFTConfig:
    name: str = "sft"
    """Method."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (default: completion and EOS only)."""


class SFT(Method):
    config = SFTConfig
    auto_class = None  # AutoModelForCausalLM
    data_schema = "sft"  # trains on prompt/completion, Alpaca, chat messages, ShareGPT rows
    encodes_sft_tokens = True  # encode below is the one distft/data/sft_arrow.py does on arrays
    eval_metrics = GENERATION_METRICS

    @staticmethod
    def default_rows(cfg) -> list[dict]:
        return sft_rows(cfg.data.num_examples)

    @staticmethod
    def encode(rows: list[dict], tokenizer, cfg, train: bool) -> tuple[list[dict], dict]:
        if vlm.processor_of(tokenizer) is not None:  # a vision-language model: chat rows with images
            return vision.encode(rows, vlm.processor_of(tokenizer), cfg, train)
        vision.refuse_images(rows, cfg.model.name_or_path)  # a text-only model would train on the paths
        examples, truncated, dropped = [], 0, 0
        for ex in tokenize_sft_batch(rows, tokenizer, cfg.data.max_length, cfg.method.train_on_prompt):
            truncated += ex.truncated
            if max(ex.labels, default=IGNORE) == IGNORE:  # ids are >= 0: no target left (in C, not per token)
                dropped += 1  # truncation removed every target token
                continue
            examples.append(ex)
        lengths = sorted(len(ex.input_ids) for ex in examples) or [0]
        stats = {
            "truncated": truncated,
            "dropped_no_target": dropped,
            "tokens_p50": lengths[len(lengths) // 2],
            "tokens_max": lengths[-1],
        }
        if cfg.data.packing and train:
            rows_out = pack(examples, cfg.data.max_length)
            stats["packed_sequences"] = len(rows_out)
        else:
            rows_out = [as_row(ex) for ex in examples]
        return rows_out, stats

    @property
    def scored_head(self) -> bool:
        """The output head runs on the scored positions only (text; image batches: every position)."""
        return vlm.processor_of(self.tokenizer) is None

    def collate(self, examples: list[dict]) -> dict:
        batch = pad_batch(examples, self.tokenizer.pad_token_id)
        processor = vlm.processor_of(self.tokenizer)
        return batch | vision.image_inputs(examples, processor) if processor is not None else batch

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Summed token loss over the batch's targets (the engine normalizes it by the global target
        count) and extra metrics as {name: (sum, count)}, averaged over the step by the engine."""
        # Image batches take the model's own forward over every position (the chunked and the
        # scored-positions paths run the decoder on text only).
        if any(k in batch for k in vision.IMAGE_INPUTS):
            return model_nll(model, batch, 0, vision.model_inputs(batch)), {}
        return model_nll(model, batch, self.cfg.train.loss_chunks), {}

    def evaluate(self, model, rows: list[dict], info, sharded: bool) -> dict:
        """eval.metrics (default exact match) of greedy generations on held-out rows."""
        if not self.cfg.train.eval_generate or not rows:
            return {}
        rows = rows[: self.cfg.data.max_eval_generations]
        if (processor := vlm.processor_of(self.tokenizer)) is not None:
            return vision_generation_metrics(model, processor, rows, self.cfg, info, sharded)
        return generation_metrics(model, self.tokenizer, rows, self.cfg, info, sharded)
