"""The models around an RL policy: the SFT warm start, the frozen reference, and the critic.

- Warm start: a random-init policy earns no reward, so `method.sft_warmup_steps` of SFT on the
  default task run on the already-wrapped policy before RL. Full tuning: the result is written
  to `<run>/sft_warmup/` (Hugging Face format) and is the reference model and the critic's init.
  Adapter tunings (LoRA, QLoRA, ...): the warm-up trains the adapter, which RL goes on training.
- Reference: a frozen copy of the RL start policy, placed by the strategy like the policy
  (sharded where it shards parameters; distft.methods.frozen); with adapter tunings the policy
  itself with the warm-up adapter swapped in (distft.methods.rl.warm_adapter), or without a
  warm-up with its adapter disabled: no second copy of the weights.
- Critic (PPO): a token-classification model with one output (a value per position) initialized
  from the start policy, wrapped by its own strategy object (sharded like the policy). With
  adapter tunings it is the base with its own LoRA adapter and a trainable value head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distft.contracts import MethodContext
from distft.data.collate import as_row, pad_batch
from distft.data.sampler import GlobalBatchSampler
from distft.data.sft_format import tokenize_sft
from distft.dtypes import PRECISION_DTYPES
from distft.methods.rl.prompts import reference_nll, warmup_rows
from distft.runtime.rank0 import on_rank0
from distft.strategies import STRATEGIES

WARMUP_DIR = "sft_warmup"
WARMUP_SEED = 1  # warm-up examples differ from the RL prompts
STATE_FILE = "rl_state.json"


def start_policy(ctx: MethodContext) -> str:
    """Path of the policy RL starts from (the reference): after the warm-up, or as loaded. When
    resuming, the path recorded in the checkpoint (no second warm-up)."""
    cfg = ctx.cfg
    if ctx.resume_path is not None:
        state_file = ctx.resume_path / STATE_FILE
        if state_file.is_file():
            return json.loads(state_file.read_text())["start_policy"]
        return ctx.model_path
    if cfg.method.sft_warmup_steps <= 0:
        return ctx.model_path
    sft_warmup(ctx)
    if ctx.tuning.adapter:  # the adapter holds the warm start (kept for the reference: WarmAdapter)
        return ctx.model_path
    out = ctx.run_dir / WARMUP_DIR
    save_hf(ctx.strategy, ctx.model_path, out, ctx.tokenizer, cfg, ctx.info, causal=True)
    return str(out)


def sft_warmup(ctx: MethodContext) -> None:
    """`method.sft_warmup_steps` SFT steps on the default task, on the wrapped policy."""
    cfg, info, g, tok = ctx.cfg, ctx.info, ctx.geometry, ctx.tokenizer
    m = cfg.method
    # Its own batch size (not train.micro_batch_size): the warm start is the same on any world size.
    global_batch = g.round_down(m.sft_warmup_batch)
    rows = warmup_rows(cfg, m.sft_warmup_steps * global_batch, WARMUP_SEED)  # rlenv: env demos
    examples = [as_row(tokenize_sft(r, tok, cfg.data.max_length, False)) for r in rows]
    sampler = GlobalBatchSampler(len(examples), global_batch, cfg.train.seed)
    first = last = float("nan")
    for step in range(m.sft_warmup_steps):
        shares = sampler.rank_micro_batches(step, g.dp_rank(info.rank), g.dp, g.accum)
        batches = [pad_batch([examples[i] for i in ids], tok.pad_token_id) for ids in shares]
        last = ctx.run_step(batches, reference_nll, m.sft_warmup_lr).loss
        first = last if step == 0 else first
    if info.is_main:
        print(
            f"distft: SFT warm-up: {m.sft_warmup_steps} steps, loss {first:.3f} -> {last:.3f}",
            flush=True,
        )


def save_hf(strategy, base_path: str, out: Path, tokenizer, cfg, info, causal: bool) -> Path:
    """Write the strategy's model to `out` in Hugging Face format (a collective; rank 0 writes)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    state = strategy.full_state_dict()

    def write() -> None:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if causal:
            fresh = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        else:
            fresh = _critic_class(base_path, cfg, AutoModelForTokenClassification)
        if any(k.startswith("base_model.model.") for k in state):  # an adapter critic: merged
            fresh = _critic_adapter(fresh, cfg)
            fresh.load_state_dict(state, strict=True)
            fresh = fresh.merge_and_unload()
        else:
            fresh.load_state_dict(state, strict=True)
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)

    on_rank0("save_hf", write, info.is_main)  # the others wait on a store key, not in a barrier
    return out


def load_reference(ctx: MethodContext, path: str):
    """A frozen copy of the start policy (in the compute dtype, placed by the strategy), or None:
    use the policy itself (adapter tunings)."""
    if ctx.tuning.adapter:  # (a resumed run's recorded base path may name the first run's copy)
        return None
    return ctx.load_frozen(path, None, PRECISION_DTYPES[ctx.cfg.train.precision])


def _critic_class(path: str, cfg, auto):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # values must be deterministic: old and new ones are compared
    return auto.from_pretrained(
        path,
        config=config,
        dtype=torch.float32,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def build_critic(ctx: MethodContext, path: str):
    """The critic, initialized from `path` with a zeroed value head, wrapped by its own strategy."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging

    cfg, info = ctx.cfg, ctx.info
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "score is newly initialized" is expected here
    try:
        critic = _critic_class(path, cfg, AutoModelForTokenClassification)
    finally:
        logging.set_verbosity(verbosity)
    head = critic.score
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    critic.config.use_cache = False
    if ctx.tuning.adapter:
        critic = _critic_adapter(critic, cfg)
    if cfg.train.gradient_checkpointing:
        critic.gradient_checkpointing_enable({"use_reentrant": False})
    strategy = STRATEGIES[cfg.strategy.name].make(cfg, info)
    strategy.setup(critic)
    return strategy


def _critic_adapter(critic, cfg):
    """The critic's own LoRA adapter (rank and targets of tuning= where it has them) and a
    trainable value head (PEFT's token-classification task saves it as `modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    from distft.tuning.peft_common import fp32_trainable

    t = cfg.tuning
    targets = getattr(t, "target_modules", ["all-linear"])
    peft_cfg = LoraConfig(
        r=getattr(t, "r", 8),
        lora_alpha=getattr(t, "alpha", 16),
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        exclude_modules=["score"],  # the value head is trained whole (modules_to_save)
        task_type="TOKEN_CLS",
    )
    return fp32_trainable(get_peft_model(critic, peft_cfg))


def write_state(path: Path, state: dict, info) -> None:
    if info.is_main:
        (path / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_state(path: Path) -> dict:
    f = path / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
