"""The model matrix (issue 14.5): small random-init models of several Hugging Face architectures,
each built from its transformers config with a BPE tokenizer trained here by `tokenizers`, trained
on real ranks over the tuning x strategy combinations that matter (LoRA on FSDP2, full on ZeRO-3,
QLoRA on FSDP2), and each export reloaded offline in a fresh process with the trained logits.

Every model gets at least one combination and every combination at least two models (CELLS);
Qwen2 + LoRA in one plain process stays in the quick tier. Nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.util import metrics, reload_exports, train

SPECIAL = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's ChatML form: the SFT data of the Qwen2 cells is chat messages, rendered by this template.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _configs(vocab: int, pad: int, eos: int) -> dict:
    """Tiny transformers configs, one per architecture (hidden 64, 2 layers)."""
    import transformers as tf

    ids = dict(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=eos)
    pos = dict(max_position_embeddings=128)
    return {
        "gpt2": tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids),  # Conv1D
        "qwen2": tf.Qwen2Config(**SHAPE, num_key_value_heads=2, **pos, **ids),
        "gemma": tf.GemmaConfig(**SHAPE, num_key_value_heads=1, head_dim=16, **pos, **ids),
        "mistral": tf.MistralConfig(**SHAPE, num_key_value_heads=2, sliding_window=64, **pos, **ids),
        "phi3": tf.Phi3Config(**SHAPE, num_key_value_heads=4, **pos, **ids),  # fused qkv / gate_up
        "mixtral": tf.MixtralConfig(
            **SHAPE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **pos, **ids
        ),
    }


# (model, tuning, strategy): each model at least once, each combination on at least two models.
CELLS = [
    ("qwen2", "lora", "fsdp"),
    ("mixtral", "lora", "fsdp"),
    ("gpt2", "full", "zero3"),
    ("phi3", "full", "zero3"),
    ("gemma", "qlora", "fsdp"),
    ("mistral", "qlora", "fsdp"),
]


def _words(n: int) -> list[str]:
    return ["".join(chr(97 + (i * 7 + k * 5) % 26) for k in range(3 + i % 3)) for i in range(n)]


def _tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained on `corpus` (a few hundred merges), as transformers' fast one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>", chat_template=CHATML
    )


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict:
    """Data files and the trained tokenizer, built once; model directories on first use (model_dir)."""
    root = tmp_path_factory.mktemp("zoo")
    rows = [{"prompt": f"reverse {w}=", "completion": w[::-1]} for w in _words(64)]
    chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in rows
    ]
    for name, data in (("plain.jsonl", rows), ("chat.jsonl", chat)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    tokenizer = _tokenizer([r["prompt"] + r["completion"] for r in rows] * 4)
    return {"root": root, "tokenizer": tokenizer, "plain": root / "plain.jsonl", "chat": root / "chat.jsonl"}


def model_dir(zoo: dict, arch: str) -> Path:
    """One architecture, random init (seed 0), saved with the zoo's tokenizer (once per session)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path, tokenizer = zoo["root"] / arch, zoo["tokenizer"]
    if not (path / "config.json").is_file():
        config = _configs(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)[arch]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def _overrides(zoo: dict, arch: str, tuning: str, strategy: str) -> list[str]:
    data = zoo["chat"] if arch.startswith("qwen") else zoo["plain"]  # the chat template at work
    return [
        "model=hf",
        f"model.name_or_path={model_dir(zoo, arch)}",
        f"tuning={tuning}",
        f"strategy={strategy}",
        f"data.path=[{data}]",
        "data.max_length=32",
        "data.near_dedup=false",
        "train.max_steps=3",
        "train.micro_batch_size=4",
        "train.lr=1e-2",
        "train.eval_generate=false",
        "resume=never",
    ]


ARCH = {
    "gpt2": "GPT2LMHeadModel",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def check_run(run_dir: Path, arch: str, tuning: str) -> None:
    """What each trained cell must show in its run dir and export."""
    losses = [r["loss"] for r in metrics(run_dir) if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 100 for x in losses), losses
    exp = run_dir / "export"
    meta = json.loads((exp / "distft_export.json").read_text())
    assert meta["adapter"] == (tuning != "full") and meta["quantized_base"] == (tuning == "qlora")
    if tuning == "full":
        assert (exp / "model.safetensors").is_file()
        assert json.loads((exp / "config.json").read_text())["architectures"] == [ARCH[arch]]
    else:
        from safetensors.torch import load_file

        names = list(load_file(str(exp / "adapter_model.safetensors")))
        assert names and all("lora_" in n for n in names)
        if arch == "mixtral":  # PEFT's all-linear reaches the experts (3-D parameters in transformers 5)
            assert any("experts" in n for n in names), names[:8]


_RUNS: dict[tuple, tuple[Path, float]] = {}


def run_cell(zoo: dict, cell: tuple[str, str, str]) -> Path:
    """Train one cell on 2 real ranks (once per session)."""
    if cell not in _RUNS:
        run_dir = zoo["root"] / "runs" / "-".join(cell)
        start = time.monotonic()
        train(run_dir, *_overrides(zoo, *cell), nproc=2)
        _RUNS[cell] = (run_dir, time.monotonic() - start)
    return _RUNS[cell][0]


@pytest.mark.quick
def test_cells_cover_every_model_and_combination():
    assert {arch for arch, *_ in CELLS} == set(ARCH)
    for combo in {(t, s) for _, t, s in CELLS}:
        assert sum((t, s) == combo for _, t, s in CELLS) >= 2, combo


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=["-".join(c) for c in CELLS])
def test_cell_trains_and_exports(zoo, cell):
    arch, tuning, _ = cell
    check_run(run_cell(zoo, cell), arch, tuning)


@pytest.mark.slow
def test_every_export_reloads_offline_in_a_fresh_process(zoo):
    exports = {cell: run_cell(zoo, cell) / "export" for cell in CELLS}
    got = reload_exports([(e, e) for e in exports.values()])
    for (arch, tuning, _), exp in exports.items():
        row = got[str(exp)]
        assert row["rel_diff"] <= 1e-4, (arch, row)  # fp32: the export's own tolerance
        assert row["arch"] == ARCH[arch]
        if tuning != "full":
            assert row["lora_b_abs_sum"] > 0  # the adapter trained (LoRA B starts at zero)
            assert row["quantized"] == (tuning == "qlora")


@pytest.mark.quick
def test_qwen2_lora_single_process(zoo, tmp_path):
    """The quick tier's member of the matrix: Qwen2 (chat template) + LoRA in one plain process."""
    run_dir = tmp_path / "run"
    train(run_dir, *_overrides(zoo, "qwen2", "lora", "ddp"), plain=True)
    check_run(run_dir, "qwen2", "lora")
    exp = run_dir / "export"
    row = reload_exports([(exp, exp)])[str(exp)]
    assert row["rel_diff"] <= 1e-4 and row["lora_b_abs_sum"] > 0 and row["arch"] == ARCH["qwen2"]
