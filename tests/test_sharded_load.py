"""Sharded loading (FSDP2, full fine-tuning): ranks build the model on the meta device and read
only their rows of each weight; training must match a normally loaded model exactly."""

from __future__ import annotations

import pytest
import torch

from tests.util import train, train_losses

COMMON = ["train.max_steps=3", "train.eval_generate=false", "train.export=none"]


@pytest.mark.slow
def test_fsdp_sharded_load_trains_like_a_full_load(tmp_path):
    proc = train(tmp_path / "fsdp", *COMMON, "strategy=fsdp")  # 2 ranks: the meta-device path
    assert "sharded load: each rank read only its shards" in proc.stdout
    train(tmp_path / "ddp", *COMMON, "strategy=ddp")  # every rank loads the whole model
    a, b = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "ddp")
    assert a.keys() == b.keys() == {1, 2, 3}
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5)


@pytest.mark.quick
def test_meta_model_needs_readable_safetensors(tmp_path):
    from distft.config.load import load_config
    from distft.models.sharded_load import meta_model
    from distft.models.tiny import build_tiny

    cfg = load_config([])[0]
    path = build_tiny(tmp_path / "m", cfg.model)
    model = meta_model(str(path), cfg)
    assert model is not None and all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary tables stay real
    (path / "model.safetensors").rename(path / "weights.bin")
    assert meta_model(str(path), cfg) is None
    del model
    torch.manual_seed(0)
