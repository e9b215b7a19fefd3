"""Greedy generation on held-out prompts, sharded over ranks, scored by exact match."""

from __future__ import annotations

import torch

from distft.data.sft_format import prompt_text, reference_answer
from distft.runtime import dist


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, device, synced: bool, batch_size: int = 64
) -> list[str]:
    """Greedy completions (text after the prompt, up to EOS). `synced` keeps ranks in lock-step
    when parameters are sharded (FSDP2 / ZeRO-3 gather them in every forward)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    outs: list[str] = []
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    if synced:  # every rank must run the same number of generate calls
        n_batches = int(max(dist.all_gather_objects(n_batches)))
    try:
        for b in range(n_batches):
            chunk = prompts[b * batch_size : (b + 1) * batch_size] or [tokenizer.eos_token or ""]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced,
            )
            if b * batch_size < len(prompts):
                new = gen[:, enc["input_ids"].shape[1] :]
                outs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def exact_match(model, tokenizer, rows: list[dict], cfg, info, sharded: bool) -> float:
    mine = rows[info.dp_rank :: info.dp_size]  # [tp] a replica's ranks generate the same rows
    prompts = [prompt_text(r, tokenizer) for r in mine]
    outs = generate(model, tokenizer, prompts, cfg.train.max_new_tokens, info.device, sharded)
    hits = sum(o.strip() == reference_answer(r).strip() for o, r in zip(outs, mine))
    total_hits, total = dist.all_reduce_sum([hits, len(mine)], info.device)
    return total_hits / max(total, 1)
