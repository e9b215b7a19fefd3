"""A tiny random-init vision-language model and a generated image task, for tests and demos.

`build_tiny_vlm(path)` writes a LLaVA (CLIP vision tower, projector, Llama language model) with
the tiny model's character tokenizer plus an `<image>` token, a CLIP image processor and a chat
template that renders image parts: an ordinary Hugging Face directory that
`AutoModelForImageTextToText` / `AutoProcessor` load offline. `write_shapes_task(folder, n)`
draws coloured shapes with PIL and writes chat rows asking for the shape's colour.

    python -m distft.models.vlm_tiny out/tiny_vlm out/shapes    # model dir, task dir
    python -m distft.train model=hf model.name_or_path=out/tiny_vlm data.path=out/shapes/shapes.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
QUESTION = "What colour is the shape?"


def build_tiny_vlm(
    path: Path,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny LLaVA (random init, seeded) with its processor to `path`."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from distft.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",  # patch features, CLS dropped
        vision_feature_layer=-1,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    size = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessor(size=size, crop_size=size, do_center_crop=False)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def draw_shape(colour: str, rng: random.Random, size: int):
    """A filled circle, square or triangle of `colour` at a random place on a grey background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    kind = rng.choice(("circle", "square", "triangle"))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif kind == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img


def write_shapes_task(folder: Path, n: int, seed: int = 0, size: int = 32) -> Path:
    """`n` chat rows (shapes.jsonl) asking the colour of a shape drawn in images/; half of the rows
    use {"type": "image", "path"} parts, half OpenAI's image_url parts with a file:// URL."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        file = (folder / "images" / f"{i:05d}.png").resolve()
        draw_shape(colour, rng, size).save(file)
        image = (
            {"type": "image", "path": str(file)}
            if i % 2
            else {"type": "image_url", "image_url": {"url": file.as_uri()}}
        )
        user = [image, {"type": "text", "text": QUESTION}]
        rows.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": colour}]}
        )
    out = folder / "shapes.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


if __name__ == "__main__":
    build_tiny_vlm(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        print(write_shapes_task(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 400))
