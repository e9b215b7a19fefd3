"""TRL's SFTTrainer on the benchmark's work: one rank's program (started by torchrun).

Same model directory, tokenizer, rows, sequence length, micro-batch, grad-accum, learning-rate
schedule, precision and strategy as the distft side; one epoch; saves the final model. A callback
stamps every optimizer step with the wall clock and TRL's own non-padding token count.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="Hugging Face model directory (also the tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=4800)
    p.add_argument("--tuning", default="full", choices=["full", "lora", "qlora"])
    p.add_argument("--strategy", default="ddp", choices=["ddp", "zero1", "zero2", "zero3", "fsdp"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=7)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--data", default="", help="prompt/completion JSONL (default: the embedded task rows)")
    p.add_argument("--packing", default="none", choices=["none", "bfd", "wrapped"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument(
        "--sequential", action="store_true", help="train on --data's rows in file order (no shuffling)"
    )
    return p.parse_args()


def main() -> None:
    import datasets
    import torch
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distft.data.default_tasks import sft_rows

    a = parse()
    rank = int(os.environ.get("RANK", "0"))
    if not torch.cuda.is_available():  # same thread policy as distft: the cores split between ranks
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    if a.data:
        dataset = datasets.load_dataset("json", data_files=a.data, split="train")
    else:
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in sft_rows(a.rows)]
        dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(a.model)

    peft_config = quant = None
    if a.tuning in ("lora", "qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=a.lora_r,
            lora_alpha=a.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    if a.tuning == "qlora":  # the same 4-bit settings as distft's tuning=qlora
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    extra: dict = {}
    if a.strategy.startswith("zero"):
        extra["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": int(a.strategy[-1])},
            "zero_allow_untested_optimizer": True,
        }
    elif a.strategy == "fsdp":
        extra["fsdp"] = "full_shard auto_wrap"
        extra["fsdp_config"] = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    args = SFTConfig(
        output_dir=a.out,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=a.accum,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=a.warmup,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_length=a.max_length,
        packing=a.packing != "none",
        packing_strategy=a.packing if a.packing != "none" else "bfd",
        bf16=a.precision == "bf16",
        gradient_checkpointing=False,
        seed=a.seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,  # every step's loss: the last-10-steps mean takes the same steps as distft's
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,  # distft's sampler drops an incomplete last global batch too
        # --sequential: the rows are already in the order to train (bench/trl_compare.py's same-order run)
        train_sampling_strategy="sequential" if a.sequential else "random",
        model_init_kwargs={"dtype": dtype},
        **extra,
    )

    class Stamp(TrainerCallback):
        """Wall clock and TRL's global non-padding token count after every optimizer step."""

        def __init__(self):
            self.rows: list[dict] = []
            self.trainer = None

        def on_step_end(self, args, state, control, **kw):
            tokens = getattr(self.trainer, "_total_train_tokens", 0)
            self.rows.append({"step": state.global_step, "time": time.time(), "tokens": int(tokens)})

    stamp = Stamp()
    trainer = SFTTrainer(
        model=a.model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quant,
        callbacks=[stamp],
    )
    stamp.trainer = trainer
    if a.tuning == "qlora":
        from bitsandbytes.nn import Linear4bit

        for m in trainer.model.modules():  # as in distft: no CPU inference repacking of 4-bit weights
            if isinstance(m, Linear4bit):
                m.support_avx512bf16_for_cpu = False
    result = trainer.train()
    trainer.save_model(a.out + "/final")
    if rank == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out = {
            "steps": stamp.rows,
            "train_loss": result.training_loss,  # mean over the epoch
            "last_logged_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,  # last 10 steps
        }
        Path(a.out, "bench_timing.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
