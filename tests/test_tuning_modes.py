"""Tuning modes prefix / ia3 / dora / adapter and layer freezing for full tuning."""

from __future__ import annotations

import json

import pytest
import torch

from distft.config.load import load_config
from distft.errors import ConfigError
from distft.tuning import TUNINGS, full, peft_common
from tests.util import REPO, metrics, train

NEW_MODES = ("prefix", "ia3", "dora", "adapter")


def _cfg(*overrides):
    return load_config(list(overrides))[0]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir)


def _model(path, auto="causal", **kw):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if auto == "causal" else AutoModelForSequenceClassification
    return cls.from_pretrained(path, dtype=torch.float32, **kw)


@pytest.mark.quick
def test_every_tuning_yaml_composes_and_is_registered():
    names = sorted(p.stem for p in (REPO / "conf" / "tuning").glob("*.yaml"))
    assert set(NEW_MODES) <= set(names)
    assert sorted(TUNINGS) == names
    for name in names:
        assert _cfg(f"tuning={name}").tuning.name == name


@pytest.mark.quick
def test_trainable_counts_per_mode(tiny):
    """Each mode trains only its own parameters; the counts are what the method defines."""
    counts = {}
    for name in ("full", "lora", "dora", "ia3", "prefix", "adapter"):
        cfg = _cfg(f"tuning={name}")
        model = TUNINGS[name].apply(_model(tiny), cfg)
        counts[name] = peft_common.count_parameters(model)
    base_total = counts["full"][1]
    assert counts["full"][0] == base_total
    # IA3 on Llama: k_proj (128) + v_proj (128) + down_proj input (384) per layer, 3 layers.
    assert counts["ia3"][0] == 3 * (128 + 128 + 384)
    # prefix: 16 virtual tokens x 3 layers x (key + value) x width 128.
    assert counts["prefix"][0] == 16 * 3 * 2 * 128
    # LLaMA-Adapter: 10 prompt tokens x width 128 + 1 gate, in the top 2 layers.
    assert counts["adapter"][0] == 2 * (10 * 128 + 1)
    # DoRA = LoRA + one magnitude per output feature of every adapted linear layer.
    outs_per_layer = 128 * 4 + 384 * 2 + 128  # q k v o, gate up, down
    assert counts["dora"][0] == counts["lora"][0] + 3 * outs_per_layer
    for name in ("lora", "dora", "ia3", "prefix", "adapter"):
        assert 0 < counts[name][0] < base_total / 5, (name, counts[name])


@pytest.mark.quick
@pytest.mark.parametrize("mode", NEW_MODES)
def test_mode_trains_only_its_parameters(tiny, mode):
    """A few optimizer steps lower the loss on a fixed batch and leave the base weights untouched."""
    cfg = _cfg(f"tuning={mode}", "train.lr=1e-2")
    torch.manual_seed(0)
    model = TUNINGS[mode].apply(_model(tiny), cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(6, 60, (4, 12))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # (LLaMA-Adapter's gates start at zero, so its first steps are small.)
    assert losses[-1] < losses[0] - 1e-3 and losses == sorted(losses, reverse=True), losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.quick
@pytest.mark.parametrize("mode", ["lora", "dora", "ia3", "prefix"])
def test_classification_head_trains_with_peft_modes(tiny, mode):
    """Sequence-classification models get PEFT's SEQ_CLS task type: the new head is trainable."""
    model = TUNINGS[mode].apply(_model(tiny, "seq", num_labels=3), _cfg(f"tuning={mode}"))
    head = [n for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert head, mode


@pytest.mark.quick
def test_freeze_patterns_and_layer_ranges(tiny):
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight", "model.norm.weight"]
    assert full.frozen_names(names, ["layers.1"]) == {names[0]}  # never layers.10
    assert full.frozen_names(names, ["layers.0-1"]) == {names[0]}
    assert full.frozen_names(names, ["layers.*.mlp"]) == set(names[:2])
    assert full.frozen_names(names, ["norm"]) == {names[2]}  # whole parts only: not 'layernorm'

    cfg = _cfg("tuning.freeze=[embed_tokens,layers.0-1]")
    model = full.apply(_model(tiny), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.layers.2.", "model.norm")) for n in trainable), trainable
    assert any(n.startswith("model.layers.2.") for n in trainable)

    with pytest.raises(ConfigError, match="matches no parameter; names look like"):
        full.apply(_model(tiny), _cfg("tuning.freeze=[lyers.0]"))
    with pytest.raises(ConfigError, match="freezes every parameter"):
        full.apply(_model(tiny), _cfg("tuning.freeze=[model]"))
    with pytest.raises(ConfigError, match="range 3-1 is empty"):
        _cfg("tuning.freeze=[layers.3-1]")


@pytest.mark.quick
def test_invalid_combinations_name_what_works(tmp_path):
    with pytest.raises(ConfigError, match="tuning=prefix does not work with strategy=fsdp.*ddp, zero1"):
        _cfg("tuning=prefix", "strategy=fsdp")
    with pytest.raises(ConfigError, match="cannot be merged"):
        _cfg("tuning=prefix", "tuning.merge_on_export=true")
    with pytest.raises(ConfigError, match="for method=classify use tuning=full, lora"):
        _cfg("tuning=adapter", "method=classify")
    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        _cfg("tuning=lora", f"tuning.init_adapter={tmp_path}")
    with pytest.raises(ConfigError, match="use strategy=ddp, zero1, zero2"):
        _cfg("tuning=prefix", "strategy=zero3")
    with pytest.raises(ConfigError, match="tuning=dora does not work with strategy=zero3.*ddp, fsdp"):
        _cfg("tuning=dora", "strategy=zero3")
    with pytest.raises(ConfigError, match="tuning=ia3 does not work with strategy=zero3.*ddp, fsdp"):
        _cfg("tuning=ia3", "strategy=zero3")
    for strategy in ("fsdp", "zero3"):  # LLaMA-Adapter works under every strategy
        _cfg("tuning=adapter", f"strategy={strategy}")
    _cfg("tuning=dora", "strategy=fsdp")
    _cfg("tuning=ia3", "strategy=fsdp")


@pytest.mark.slow
def test_prefix_under_zero2_and_frozen_layers_under_fsdp(tmp_path):
    """2 real ranks: prefix tuning under ZeRO-2 trains and exports an adapter that reproduces the
    trained logits; full tuning with frozen layers under FSDP2 leaves exactly the frozen weights
    unchanged in the export."""
    from safetensors.torch import load_file

    common = ["train.max_steps=4", "train.micro_batch_size=4", "data.num_examples=120", "train.lr=1e-2"]
    prefix = tmp_path / "prefix"
    train(prefix, "tuning=prefix", "strategy=zero2", *common)
    meta = json.loads((prefix / "export" / "distft_export.json").read_text())
    assert meta["tuning"] == "prefix" and meta["probe_max_abs_diff"] < 1e-3
    conf = json.loads((prefix / "export" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PREFIX_TUNING" and conf["num_virtual_tokens"] == 16
    losses = [r["loss"] for r in metrics(prefix) if "loss" in r]
    assert len(losses) == 4 and all(x == x for x in losses)

    frz = tmp_path / "freeze"
    proc = train(frz, "strategy=fsdp", "tuning.freeze=[embed_tokens,layers.0-1]", *common)
    assert "trainable parameters" in proc.stdout
    base = load_file(str(frz / "base_model" / "model.safetensors"))
    out = load_file(str(frz / "export" / "model.safetensors"))
    for name, w in base.items():
        frozen = "embed_tokens" in name or ".layers.0." in name or ".layers.1." in name
        assert torch.equal(out[name], w) == frozen, name
