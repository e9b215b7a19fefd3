"""Chat rows with images, for vision-language SFT.

Input rows are chat messages whose content parts include images: `{"type": "image", "path": ...}`
(also `"image"` or `"url"` for the file) or OpenAI's `{"type": "image_url", "image_url": {"url":
"file:///..." or a local path}}`. Schema mapping turns each image part into an inline marker
`<|image:/abs/path|>` in the message's text (`content_text`), so cleaning, dedup (two rows with the
same words but other images stay two rows) and the Arrow cache handle the row as text. Encoding
turns the markers back into content parts, renders the conversation with the model's processor
(its chat template, then `processor(text, images)`, which expands each image into its image
tokens) and keeps the image paths in the example; pixels are computed in the collate, so the
cache holds token ids and paths, not pixel tensors.

Only assistant tokens are targets: each assistant turn's token span is found by rendering the
conversation up to it (with and without the turn) through the same processor.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from distft.data.sft_format import IGNORE
from distft.errors import DataError

MARKER = re.compile(r"<\|image:(.*?)\|>")
IMAGE_TYPES = ("image", "image_url")
# Processor outputs that are model inputs besides the text (LLaVA, Qwen2-VL, Idefics3, Gemma3, ...).
IMAGE_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_sizes",
    "image_attention_mask",
)


# ---------------------------------------------------------------- canonical rows
def has_image_parts(content) -> bool:
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") in IMAGE_TYPES for p in content
    )


def _image_path(part: dict, where: str) -> str:
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        ref = ref.get("url") if isinstance(ref, dict) else ref
    else:
        ref = part.get("path") or part.get("image") or part.get("url")
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: image part {part!r} names no file; give {{'type': 'image', 'path': ...}}")
    if ref.startswith("file://"):
        ref = unquote(urlparse(ref).path)
    elif re.match(r"^[a-z]+://", ref) or ref.startswith("data:"):
        raise DataError(f"{where}: image {ref[:60]!r} is not a local file; download it and give its path")
    path = Path(ref).expanduser()
    source = re.match(r"^(.*?)(?::\d+|#\d+)$", where)  # file:line or file#row of the row
    if not path.is_absolute() and source and (Path(source.group(1)).parent / path).is_file():
        path = Path(source.group(1)).parent / path  # relative to the data file first, then the cwd
    path = path.resolve()
    if not path.is_file():
        raise DataError(f"{where}: image file {str(path)!r} does not exist")
    return str(path)


def content_text(parts: list, where: str, turn: int) -> str:
    """Content parts (text and images) as one text with an inline marker per image."""
    out = []
    for p in parts:
        if not isinstance(p, dict) or p.get("type") not in ("text", *IMAGE_TYPES):
            raise DataError(f"{where}: turn {turn}: content part {p!r} is not a text or image part")
        if p["type"] == "text":
            text = p.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: turn {turn}: a text part's 'text' must be a string")
            out.append(text)
        else:
            out.append(f"<|image:{_image_path(p, where)}|>")
    return "".join(out)


def has_images(row: dict) -> bool:
    msgs = row.get("messages")
    return isinstance(msgs, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), str) and MARKER.search(m["content"])
        for m in msgs
    )


def refuse_images(rows: list[dict], model: str | None) -> None:
    """One line when image rows meet a text-only model."""
    for row in rows:
        if has_images(row):
            raise DataError(
                f"{row.get('_source', '?')}: the row has images but model {model or 'tiny'!r} is a text-only "
                "model; use a vision-language model (its config has a vision_config) or drop the images"
            )


def to_parts(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """Messages with content parts for the processor's chat template, and the image paths in order."""
    out, images = [], []
    for m in messages:
        parts = []
        pieces = MARKER.split(m["content"])  # text, path, text, path, ..., text
        for i, piece in enumerate(pieces):
            if i % 2:
                parts.append({"type": "image"})
                images.append(piece)
            elif piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out, images


def length_text(row: dict, tokenizer) -> str:
    """The row's rendered text for length statistics and filters, each image as one image token."""
    token = getattr(getattr(tokenizer, "processor", None), "image_token", "") or ""
    msgs = [{"role": m["role"], "content": MARKER.sub(token, m["content"])} for m in row["messages"]]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return "\n".join(m["content"] for m in msgs)


# ---------------------------------------------------------------- encoding
def load_images(paths: list[str]):
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append(img.convert("RGB"))
        except OSError as e:
            raise DataError(f"cannot read image {p!r}: {e}") from None
    return out


def _ids(processor, messages: list[dict], images: list[str], generation_prompt: bool) -> list[int]:
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    enc = processor(text=text, images=load_images(images) or None, add_special_tokens=False)
    ids = enc["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def tokenize_row(row: dict, processor, max_length: int, train_on_prompt: bool) -> tuple[dict | None, bool]:
    """({input_ids, labels, position_ids, images}, truncated) of one chat row; the example is None
    when max_length would cut through an image's tokens (the model needs all of them)."""
    msgs, images = to_parts(row["messages"])
    ids = _ids(processor, msgs, images, False)
    labels = list(ids) if train_on_prompt else [IGNORE] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or train_on_prompt:
            continue
        n_images = sum(p["type"] == "image" for mm in msgs[:i] for p in mm["content"])
        start = _ids(processor, msgs[:i], images[:n_images], True)
        end = _ids(processor, msgs[: i + 1], images[:n_images], False)
        if ids[: len(start)] != start or ids[: len(end)] != end:
            raise DataError(
                f"{row.get('_source', '?')}: the chat template renders a conversation's prefix differently "
                "from the whole conversation, so the assistant tokens cannot be found"
            )
        labels[len(start) : len(end)] = ids[len(start) : len(end)]
    if labels:
        labels[0] = IGNORE
    image_token = getattr(processor, "image_token_id", None)
    if len(ids) > max_length and image_token is not None and image_token in ids[max_length:]:
        return None, True
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": list(range(len(ids))),
        "images": images,
    }, truncated


def encode(rows: list[dict], processor, cfg, train: bool) -> tuple[list[dict], dict]:
    """SFT examples of chat rows with images (rows without images are encoded the same way)."""
    examples, truncated, dropped, cut_image = [], 0, 0, 0
    for row in rows:
        if "messages" not in row:
            raise DataError(f"{row.get('_source', '?')}: rows with images must be chat 'messages'")
        ex, cut = tokenize_row(row, processor, cfg.data.max_length, cfg.method.train_on_prompt)
        truncated += cut
        if ex is None:
            cut_image += 1
            continue
        if all(label == IGNORE for label in ex["labels"]):
            dropped += 1
            continue
        examples.append(ex)
    lengths = sorted(len(ex["input_ids"]) for ex in examples) or [0]
    stats = {
        "truncated": truncated,
        "dropped_no_target": dropped,
        "dropped_image_cut": cut_image,
        "tokens_p50": lengths[len(lengths) // 2],
        "tokens_max": lengths[-1],
    }
    return examples, stats


# ---------------------------------------------------------------- batches
def image_inputs(examples: list[dict], processor) -> dict[str, torch.Tensor]:
    """The image processor's tensors for every image of the micro-batch, in example order."""
    paths = [p for ex in examples for p in ex.get("images", [])]
    if not paths:
        return {}
    out = processor.image_processor(images=load_images(paths), return_tensors="pt")
    return {k: v for k, v in out.items() if k in IMAGE_INPUTS and torch.is_tensor(v)}


def model_inputs(batch: dict) -> dict:
    """The forward arguments of a batch: text, positions and any image tensors. Models with
    multimodal rotary positions (Qwen2-VL's image_grid_thw) compute their positions themselves."""
    out = {"input_ids": batch["input_ids"], "use_cache": False}
    out.update({k: batch[k] for k in IMAGE_INPUTS if k in batch})
    if "image_grid_thw" not in batch:
        out["position_ids"] = batch["position_ids"]
    return out
