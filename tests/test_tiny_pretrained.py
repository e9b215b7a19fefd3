"""model=tiny_pretrained (issue 13.7): the tiny Llama from shipped weights pre-trained on general
string tasks, so an adapter demo learns a task new to the base; model=tiny stays random-init."""

from __future__ import annotations

import json

import pytest
import torch

from distft.config.load import load_config
from distft.data.default_tasks import TASKS as DEFAULT_TASKS
from distft.errors import ConfigError
from distft.models.tiny import PRETRAINED_WEIGHTS, build_tiny, random_base_warning
from distft.tiny_pretrain import SEED, TASKS
from tests.util import train


def _metadata() -> dict:
    from safetensors import safe_open

    with safe_open(str(PRETRAINED_WEIGHTS), "pt") as f:
        return f.metadata()


@pytest.mark.quick
def test_shipped_weights_are_small_and_say_how_to_rebuild_them():
    assert PRETRAINED_WEIGHTS.stat().st_size <= 3_000_000
    meta = _metadata()
    assert meta["seed"] == str(SEED) and "distft.tiny_pretrain" in meta["command"]
    assert json.loads(meta["tasks"]) == sorted(TASKS)
    assert not set(TASKS) & set(DEFAULT_TASKS)  # the demo tasks (reverse, sort) are new to the base


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bases")
    out = {}
    for option in ("tiny", "tiny_pretrained"):
        path = build_tiny(root / option, load_config([f"model={option}"])[0].model)
        out[option] = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    return out


def _answer(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.quick
def test_pretrained_base_knows_its_tasks_not_the_demo_tasks(bases):
    model, tok = bases["tiny_pretrained"]
    words = ["cat", "milk", "zebra", "quiet", "bow"]
    cases = [(f"{t} {w}=", TASKS[t](w)) for t in ("copy", "upper", "shift", "double", "max") for w in words]
    known = sum(_answer(model, tok, p) == want for p, want in cases) / len(cases)
    new = sum(_answer(model, tok, f"reverse {w}=") == w[::-1] for w in words if w != w[::-1])
    random_model, random_tok = bases["tiny"]
    random_known = sum(_answer(random_model, random_tok, p) == want for p, want in cases) / len(cases)
    assert known >= 0.8 and random_known == 0.0, (known, random_known)
    assert new <= 1  # reverse was never taught


@pytest.mark.quick
def test_tiny_stays_random_init_and_pretrained_loads_the_shipped_file(bases):
    from safetensors.torch import load_file

    shipped = load_file(str(PRETRAINED_WEIGHTS))
    pre = bases["tiny_pretrained"][0].state_dict()
    rnd = bases["tiny"][0].state_dict()
    for name, value in shipped.items():
        assert torch.equal(pre[name], value), name
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(rnd[name], shipped[name])


@pytest.mark.quick
def test_pretrained_refuses_another_shape_and_needs_no_warning(tmp_path):
    cfg = load_config(["model=tiny_pretrained", "model.hidden_size=64"])[0]
    with pytest.raises(ConfigError, match=r"model.hidden_size=64 \(shipped: 128\)"):
        build_tiny(tmp_path / "m", cfg.model)
    assert random_base_warning(load_config(["model=tiny_pretrained", "tuning=lora"])[0], adapter=True) is None
    warning = random_base_warning(load_config(["tuning=lora"])[0], adapter=True)
    assert warning and "model=tiny_pretrained" in warning


@pytest.mark.slow
def test_lora_on_the_pretrained_base_learns_a_new_task(tmp_path):
    """The adapter demo: LoRA on model=tiny_pretrained learns reverse/sort (the default data, new to
    the base) from exact match ~0 to >= 0.5 on the held-out split, in one short process."""
    run_dir = tmp_path / "run"
    train(run_dir, *LORA_DEMO, plain=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["before"]["exact_match"] <= 0.1
    assert summary["after"]["exact_match"] >= 0.5, summary


LORA_DEMO = [
    "model=tiny_pretrained",
    "tuning=lora",
    "data.num_examples=2000",
    "data.max_eval_generations=64",
    "train.epochs=3",
    "train.lr=5e-3",
    "resume=never",
]
