"""Generation metrics on held-out image chat rows (vision-language SFT): greedy answers with the
rows' images through the model's processor, sharded over ranks, gathered, scored once."""

from __future__ import annotations

from distft.data.vision import load_images, to_parts
from distft.eval.generation import DEFAULT
from distft.eval.text_metrics import score_texts
from distft.models.generation import greedy
from distft.runtime import dist


def generate(model, processor, rows: list[dict], max_new_tokens: int, device, synced: bool) -> list[str]:
    """Greedy answers to each row's conversation up to its last assistant turn, with its images
    (`greedy`; sharded weights gathered once per batch, which also covers the vision tower that
    generate() runs outside a forward, where FSDP2's hooks would not gather root-level weights)."""
    tok = processor.tokenizer

    def encode(lo: int, hi: int) -> dict:
        texts, images = [], []
        for r in rows[lo:hi]:
            last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
            msgs, paths = to_parts(r["messages"][:last])
            texts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            images += paths
        enc = processor(
            text=texts or [tok.eos_token or ""],  # a rank out of rows still takes part in the synced generate
            images=load_images(images) or None,
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        return enc.to(device)

    return greedy(model, tok, len(rows), encode, max_new_tokens, synced, batch_size=32, gather=synced)


def generation_metrics(model, processor, rows: list[dict], cfg, info, sharded: bool) -> dict[str, float]:
    """eval.metrics of greedy answers on held-out image rows, sharded over ranks, scored once."""
    mine = rows[info.rank :: info.world_size]
    outs = generate(model, processor, mine, cfg.train.max_new_tokens, info.device, sharded)
    refs = [[m for m in r["messages"] if m["role"] == "assistant"][-1]["content"] for r in mine]
    gathered = dist.all_gather_objects(list(zip(outs, refs)))
    pairs = [g[i] for i in range(max((len(g) for g in gathered), default=0)) for g in gathered if i < len(g)]
    names = tuple(cfg.eval.metrics) or DEFAULT
    return score_texts([p for p, _ in pairs], [r for _, r in pairs], names)
