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


def _hub_cache(tmp_path, cfg):
    """The tiny model laid out as the Hugging Face cache holds a downloaded hub id (distft/tiny)."""
    import shutil

    from distft.models.tiny import build_tiny

    src = build_tiny(tmp_path / "src", cfg.model)
    cache, rev = tmp_path / "hf_cache", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--distft--tiny"
    shutil.copytree(src, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return cache


@pytest.mark.quick
def test_meta_model_reads_a_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    """A hub id (what every recipe names) resolves to its cached snapshot with no network."""
    import huggingface_hub.constants

    from distft.config.load import load_config
    from distft.models.sharded_load import local_dir, meta_model

    cfg = load_config([])[0]
    cache = _hub_cache(tmp_path, cfg)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE sets
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert (
        local_dir("distft/tiny")
        == cache / "models--distft--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    )
    assert local_dir("distft/absent") is None and local_dir(str(tmp_path / "no-dir")) is None
    model = meta_model("distft/tiny", cfg)
    assert model is not None and all(p.is_meta for p in model.parameters())


@pytest.mark.slow
def test_fsdp_sharded_load_from_a_hub_cache(tmp_path):
    """2 ranks on fsdp, model.name_or_path a hub id in the local cache (HF_HUB_OFFLINE=1): each rank
    reads only its shards, and trains as from the plain directory."""
    from distft.config.load import load_config

    cache = _hub_cache(tmp_path, load_config([])[0])
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = train(tmp_path / "hub", *COMMON, "strategy=fsdp", "model.name_or_path=distft/tiny", extra_env=env)
    assert "sharded load: each rank read only its shards" in proc.stdout
    train(tmp_path / "dir", *COMMON, "strategy=fsdp", f"model.name_or_path={tmp_path / 'src'}")
    a, b = train_losses(tmp_path / "hub"), train_losses(tmp_path / "dir")
    assert a.keys() == b.keys() == {1, 2, 3} and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)
