"""distft-export merge/combine, and continual learning (init_adapter + replay)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from distft.errors import ConfigError, DistftError
from distft.tools import adapters
from distft.tools.export_cli import main as export_main
from tests.util import metrics, train

IDS = torch.tensor([[10, 11, 12, 13, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir)


def _causal(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _lora_adapter(tiny, out: Path, seed: int, r: int = 4, quantized: bool = False, **lora_kw) -> torch.Tensor:
    """A LoRA adapter with random (non-zero) weights saved to `out`; returns the adapted logits."""
    from peft import LoraConfig, get_peft_model

    kw = {}
    if quantized:
        from bitsandbytes.nn import Linear4bit

        kw["quantization_config"] = adapters._bnb_config(out)
    base = _causal(tiny, **kw)
    for m in base.modules():
        if quantized and isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False
    torch.manual_seed(seed)
    conf = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False, **lora_kw)
    model = get_peft_model(base, conf).eval()
    model.peft_config["default"].base_model_name_or_path = tiny
    model.save_pretrained(out)
    (out / "distft_export.json").write_text(json.dumps({"quantized_base": quantized, "tuning": "lora"}))
    return _logits(model)


@pytest.mark.quick
def test_merge_lora_reproduces_the_adapted_model(tiny, tmp_path):
    want = _lora_adapter(tiny, tmp_path / "a", seed=1)
    assert export_main(["merge", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    merged = _causal(tmp_path / "m")
    assert torch.allclose(_logits(merged), want, atol=1e-4)
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    assert (tmp_path / "m" / "tokenizer_config.json").exists() or (tmp_path / "m" / "tokenizer.json").exists()


@pytest.mark.quick
def test_merge_qlora_into_dequantized_base_warns_and_beats_naive_merge(tiny, tmp_path):
    """The QLoRA adapter was trained on NF4 weights: merging into the dequantized 4-bit base keeps
    the trained behaviour (up to bf16 rounding); merging into the original weights does not."""
    want = _lora_adapter(tiny, tmp_path / "q", seed=2, quantized=True)
    with pytest.warns(UserWarning, match="merging a QLoRA adapter.*saved in bf16"):
        out = adapters.merge(tmp_path / "q", tmp_path / "qm")
    merged = _causal(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    err = float((_logits(merged) - want).abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = _causal(adapters.merge(tmp_path / "q", tmp_path / "naive", from_4bit=False, dtype="bf16"))
    naive_err = float((_logits(naive) - want).abs().max())
    assert err < 0.02 * float(want.abs().max()), err
    assert err * 5 < naive_err, (err, naive_err)
    assert json.loads((out / "distft_export.json").read_text())["dequantized_from_4bit"] is True


@pytest.mark.quick
def test_combine_lora_adapters(tiny, tmp_path):
    a = _lora_adapter(tiny, tmp_path / "a", seed=3)
    b = _lora_adapter(tiny, tmp_path / "b", seed=4)
    base = _logits(_causal(tiny))
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]

    def combined(how, weights, **kw):
        from peft import PeftModel

        out = adapters.combine(dirs, weights, tmp_path / f"{how}-{weights}", how=how, **kw)
        return _logits(PeftModel.from_pretrained(_causal(tiny), str(out)).eval())

    # linear with weights [1, 0] is adapter a exactly (PEFT scales A and B by sqrt(weight))
    assert torch.allclose(combined("linear", [1.0, 0.0]), a, atol=1e-4)
    assert torch.allclose(combined("linear", [0.0, 1.0]), b, atol=1e-4)
    # cat stacks the ranks: the deltas add with their weights exactly; compare merged weights
    cat_dir = adapters.combine(dirs, [0.5, 0.5], tmp_path / "cat", how="cat")
    w = {}
    for name, d in (("a", dirs[0]), ("b", dirs[1]), ("cat", cat_dir)):
        m = _causal(adapters.merge(d, tmp_path / f"merged-{name}"))
        w[name] = m.model.layers[0].self_attn.q_proj.weight
    w0 = _causal(tiny).model.layers[0].self_attn.q_proj.weight
    expected = w0 + 0.5 * (w["a"] - w0) + 0.5 * (w["b"] - w0)
    assert torch.allclose(w["cat"], expected, atol=1e-5)
    assert json.loads((Path(cat_dir) / "adapter_config.json").read_text())["r"] == 8
    # TIES and DARE-TIES (density 0.5) give a different, finite adapter of the same base
    for how in ("ties", "dare_ties"):
        torch.manual_seed(0)
        got = combined(how, [0.6, 0.4], density=0.5)
        assert torch.isfinite(got).all() and not torch.allclose(got, base, atol=1e-4)
        meta = json.loads((tmp_path / f"{how}-[0.6, 0.4]" / "distft_export.json").read_text())
        assert meta["combination"] == how and meta["density"] == 0.5


@pytest.mark.quick
def test_tool_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        adapters.merge(tmp_path, tmp_path / "x")
    from peft import PrefixTuningConfig, get_peft_model

    prefix = get_peft_model(_causal(tiny), PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    prefix.save_pretrained(tmp_path / "p")
    with pytest.raises(ConfigError, match="PREFIX_TUNING adapter: .*nothing to merge"):
        adapters.merge(tmp_path / "p", tmp_path / "x")
    _lora_adapter(tiny, tmp_path / "a", seed=5, r=4)
    _lora_adapter(tiny, tmp_path / "b", seed=6, r=8)
    with pytest.raises(DistftError, match="linear needs equal ranks"):
        adapters.combine([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "c", how="linear")
    with pytest.raises(ConfigError, match="2 adapters but 1 weights"):
        adapters.combine([tmp_path / "a", tmp_path / "b"], [1.0], tmp_path / "c")
    assert (
        export_main(
            ["combine", str(tmp_path / "a"), str(tmp_path / "p"), "--weights", "1", "1", "--out", "x"]
        )
        == 2
    )


@pytest.mark.slow
def test_continue_from_adapter_with_replay(tmp_path):
    """Train a LoRA classifier on old data, then continue from its exported adapter on new data with
    30% replay. With an lr far below fp32 resolution (lr must be > 0) the continued run must export
    exactly the adapter it started from (head included), and the data report shows the replayed
    share of the train split."""
    from safetensors.torch import load_file

    from distft.methods.classify import default_rows

    rows = default_rows(300, seed=1)
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows[:150]))
    new.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows[150:]))
    common = ["method=classify", "tuning=lora", "train.micro_batch_size=16"]
    first = tmp_path / "first"
    train(first, *common, f"data.path=[{old}]", "train.max_steps=6", "train.lr=1e-2", nproc=1)
    export = first / "export"
    second = tmp_path / "second"
    train(
        second,
        *common,
        f"data.path=[{new}]",
        f"model.name_or_path={export / 'base'}",
        f"tuning.init_adapter={export}",
        f"data.replay_path=[{old}]",
        "data.replay_fraction=0.3",
        "train.max_steps=2",
        "train.lr=1e-30",  # no representable change to any weight
        nproc=1,
    )
    trained = load_file(str(export / "adapter_model.safetensors"))
    continued = load_file(str(second / "export" / "adapter_model.safetensors"))
    assert sorted(trained) == sorted(continued) and any("score" in k for k in trained)
    for k, v in trained.items():
        assert torch.equal(continued[k], v), k
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)  # really trained
    report = json.loads((second / "data_report.json").read_text())
    replay = report["replay"]
    n_train_new = report["splits"]["train"]["rows"] - replay["rows_replayed"]
    assert replay["rows_replayed"] == round(n_train_new * 0.3 / 0.7) > 0
    assert abs(replay["fraction"] - 0.3) < 0.02
    assert [r["step"] for r in metrics(second) if "loss" in r] == [1, 2]
