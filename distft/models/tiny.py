"""The tiny default: a random-init Llama with a character tokenizer, built deterministically.

It is written as an ordinary Hugging Face directory, so the rest of distft (quantization, PEFT,
export, `from_pretrained` in tests) treats it exactly like a real model. With `model.pretrained`
(model=tiny_pretrained) the same model starts from the shipped weights in PRETRAINED_WEIGHTS,
pre-trained on general string tasks by `python -m distft.tiny_pretrain`.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import torch

from distft.errors import ConfigError

PRETRAINED_WEIGHTS = Path(__file__).with_name("tiny_pretrained.safetensors")
SHAPE_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
)
SPECIAL = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """Character-level fast tokenizer; `<|end|>` is both EOS and end of turn."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        chat_template=CHAT_TEMPLATE,
    )


SPEC = "distft_tiny.json"  # the model.* keys it was built from


def _spec(model_cfg) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
    return {k: getattr(model_cfg, k) for k in (*keys, "max_position_embeddings", "init_seed")}


def _matches(path: Path, model_cfg) -> bool:
    """`path` holds the tiny model these model.* keys build (also one built before SPEC existed)."""
    if not (path / "config.json").is_file():
        return False
    if (path / SPEC).is_file():
        return json.loads((path / SPEC).read_text()) == _spec(model_cfg)
    c = json.loads((path / "config.json").read_text())
    have = (c.get("hidden_size"), c.get("intermediate_size"), c.get("num_hidden_layers"))
    have += (c.get("num_attention_heads"), c.get("num_key_value_heads"), c.get("max_position_embeddings"))
    return have == tuple(_spec(model_cfg).values())[:6]


def build_tiny(path: Path, model_cfg) -> Path:
    """Write the tiny model + tokenizer to `path` once (atomic rename, so ranks may race)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if _matches(path, model_cfg):
        return path
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    gen = torch.Generator().manual_seed(model_cfg.init_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        model = LlamaForCausalLM(config)
    if getattr(model_cfg, "pretrained", False):
        load_pretrained(model, model_cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SPEC).write_text(json.dumps(_spec(model_cfg)))
    if path.exists():  # built for other model.* keys: replaced, never reused (no checkpoint needs it)
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another rank or node finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_pretrained(model, model_cfg, weights: Path = PRETRAINED_WEIGHTS) -> None:
    """Load the shipped pre-trained weights into a freshly built tiny model of the same shape."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(weights), "pt") as f:
        shape = json.loads(f.metadata()["shape"])
    wrong = {k: getattr(model_cfg, k) for k in SHAPE_KEYS if getattr(model_cfg, k) != shape[k]}
    if wrong:
        changed = ", ".join(f"model.{k}={v} (shipped: {shape[k]})" for k, v in wrong.items())
        raise ConfigError(
            f"model.pretrained=true loads the shipped tiny base, whose shape is fixed: {changed}; "
            "drop those overrides, or set model.pretrained=false for a random-init model of any shape"
        )
    load_model(model, str(weights), strict=True)


def random_base_warning(cfg, adapter: bool) -> str | None:
    """One line when an adapter is trained on the random-init tiny default: the base knows nothing,
    so an adapter on it has nothing to adapt and learns little (exact match stays near 0)."""
    if not adapter or cfg.model.name_or_path or getattr(cfg.model, "pretrained", False):
        return None
    return (
        f"distft: warning: tuning={cfg.tuning.name} trains an adapter on the tiny default model, which is "
        "random-init (not pre-trained): expect it to learn little. Use model=tiny_pretrained (the tiny "
        "model pre-trained on general string tasks), or a real base (model=hf "
        "model.name_or_path=<hub id or directory>); on the random-init tiny model use tuning=full"
    )
