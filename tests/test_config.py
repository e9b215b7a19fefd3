"""Config composition and validation: every shipped option builds; bad input gets one clear message."""

from __future__ import annotations

import pytest

from distft.config.load import load_config, strip_launcher_args
from distft.errors import ConfigError
from distft.paths import conf_dir
from tests.util import train

pytestmark = pytest.mark.quick

GROUPS = ["model", "tuning", "method", "strategy", "cluster", "data", "logger"]
NEEDS = {
    ("model", "hf"): ["model.name_or_path=org/some-model"],
    ("method", "distill"): ["method.teacher=org/some-teacher"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda x: str(x))
def test_every_shipped_option_composes_and_validates(group, option):
    cfg, _ = load_config([f"{group}={option}", *NEEDS.get((group, option), [])])
    if (group, option) == ("strategy", "auto"):  # the planner resolves it to a concrete strategy
        assert cfg.strategy.name in _options("strategy") and cfg.strategy.name != "auto"
    else:
        assert getattr(cfg, group).name == option


def test_defaults():
    cfg, _ = load_config([])
    assert (cfg.model.name, cfg.tuning.name, cfg.method.name, cfg.strategy.name) == (
        "tiny",
        "full",
        "sft",
        "ddp",
    )
    assert cfg.resume == "auto" and cfg.train.log_every == 1 and cfg.data.splits == [8, 1, 1]


def test_single_string_data_path_becomes_a_list(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg, _ = load_config([f"data.path={f}"])
    assert cfg.data.path == [str(f)]


def test_deepspeed_local_rank_argument_is_dropped():
    assert strip_launcher_args(["--local_rank=1", "train.lr=1"]) == ["train.lr=1"]
    assert strip_launcher_args(["--local-rank", "0", "a=b"]) == ["a=b"]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'. Valid keys under 'train':"),
        (["+train.lrr=1"], "unknown config key 'train.lrr'"),
        (["+tuning.rank=4", "tuning=lora"], "unknown config key 'tuning.rank'"),
        (["strategy=zero9"], "option 'strategy/zero9'. Valid options for 'strategy': auto, ddp, fsdp"),
        (["strategy=zero2", "train.precision=fp16"], "DeepSpeed has no fp16 on CPU"),
        (["strategy=fsdp", "train.precision=fp16"], "use train.precision=bf16"),
        (["train.precision=fp8"], "valid: fp32, bf16, fp16"),
        (["model=hf", "model.name_or_path=/no/such/dir"], "is not a directory"),
        (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
        (["train.max_steps=0", "train.epochs=0"], "set train.max_steps > 0 or train.epochs > 0"),
        (["resume=/no/such/ckpt"], "no such checkpoint"),
        (["tuning=lora", "tuning.r=0"], "need r >= 1"),
        (["strategy=zero2", "strategy.offload_params=true"], "needs strategy.stage=3"),
        (["train.lr=fast"], "config key 'train.lr' got 'fast'; expected float"),
    ],
)
def test_bad_config_gets_one_clear_message(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert expected in str(e.value)


def test_entry_point_prints_message_not_traceback(tmp_path):
    proc = train(tmp_path, "train.lrr=1", plain=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert "distft: error: unknown config key 'train.lrr'" in proc.stderr
    assert "Traceback" not in proc.stderr
