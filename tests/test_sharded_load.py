"""Sharded loading, single-process parts: the meta-device model and hub ids in the local cache.
The multi-rank checks (memory per rank on fsdp/hsdp/zero3, training equal to a whole load) are in
tests/test_sharded_load_multirank.py."""

from __future__ import annotations

import pytest
import torch


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
