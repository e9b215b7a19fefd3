"""Generation metrics on held-out image chat rows (vision-language SFT): greedy answers with the
rows' images through the model's processor, sharded over ranks, gathered, scored once."""

from __future__ import annotations

import torch

from distft.data.vision import load_images, to_parts
from distft.eval.generation import DEFAULT
from distft.eval.text_metrics import score_texts
from distft.models.generation import generation_mode
from distft.runtime import dist


@torch.no_grad()
def generate(model, processor, rows: list[dict], max_new_tokens: int, device, synced: bool) -> list[str]:
    """Greedy answers to each row's conversation up to its last assistant turn, with its images.
    `synced`: sharded parameters, so every rank runs the same number of generate calls."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    was_training = model.training
    model.eval()
    batch_size = 32
    n_batches = (len(rows) + batch_size - 1) // batch_size
    if synced:
        n_batches = int(max(dist.all_gather_objects(n_batches)))
    outs: list[str] = []
    try:
        # Sharded weights gathered once for the whole call (generation_mode): generate() also runs
        # the vision tower outside a forward, where FSDP2's hooks would not gather root-level weights.
        with generation_mode(model, gather=synced):
            for b in range(n_batches):
                chunk = rows[b * batch_size : (b + 1) * batch_size]
                texts, images = [], []
                if not chunk:  # a rank out of rows still takes part in the synced generate
                    texts.append(tok.eos_token or "")
                for r in chunk:
                    last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
                    msgs, paths = to_parts(r["messages"][:last])
                    texts.append(
                        processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                    )
                    images += paths
                enc = processor(
                    text=texts,
                    images=load_images(images) or None,
                    padding=True,
                    add_special_tokens=False,
                    return_tensors="pt",
                ).to(device)
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    synced_gpus=synced,
                )
                if b * batch_size < len(rows):
                    outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
        model.train(was_training)
    return outs


def generation_metrics(model, processor, rows: list[dict], cfg, info, sharded: bool) -> dict[str, float]:
    """eval.metrics of greedy answers on held-out image rows, sharded over ranks, scored once."""
    mine = rows[info.rank :: info.world_size]
    outs = generate(model, processor, mine, cfg.train.max_new_tokens, info.device, sharded)
    refs = [[m for m in r["messages"] if m["role"] == "assistant"][-1]["content"] for r in mine]
    gathered = dist.all_gather_objects(list(zip(outs, refs)))
    pairs = [g[i] for i in range(max((len(g) for g in gathered), default=0)) for g in gathered if i < len(g)]
    names = tuple(cfg.eval.metrics) or DEFAULT
    return score_texts([p for p, _ in pairs], [r for _, r in pairs], names)
