"""Compose conf/ with Hydra, turn it into typed dataclasses, and check cross-field rules early."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distft.config.schema import (
    CLUSTERS,
    ClusterConfig,
    DataConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    RootConfig,
    TrainConfig,
)
from distft.errors import ConfigError
from distft.paths import conf_dir

# conf/cluster: cluster.nproc_per_node defaults to one rank per GPU on GPU nodes, 2 on CPU nodes.
OmegaConf.register_new_resolver(
    "distft_ranks_per_node", lambda gpus: int(gpus) if int(gpus) > 0 else 2, replace=True
)

_LOCAL_RANK = re.compile(r"^--local[_-]rank(=\d+)?$")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` (added by the deepspeed launcher) so Hydra sees only overrides."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if _LOCAL_RANK.match(arg):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def compose(overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml with overrides; Hydra's own errors become one clear message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain_hydra_error(str(e), overrides)) from None


def _explain_hydra_error(msg: str, overrides: list[str]) -> str:
    first = msg.strip().splitlines()[0]
    m = re.search(r"Key '([^']+)' is not in struct", msg)
    if m or "Could not override" in msg or "Could not append" in msg:
        key = re.search(r"override '([^']+)'", msg) or m
        name = key.group(1) if key else "?"
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        option = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{parent}=")), None)
        valid = ", ".join(sorted(_valid_keys(parent, option))) or "(see conf/)"
        return f"unknown config key '{name}'. Valid keys under '{parent or '<root>'}': {valid}"
    m = re.search(r"Could not find '([^']+)'", msg)
    if m:
        group = m.group(1).split("/")[0]
        opts = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        return f"unknown option '{m.group(1)}'. Valid options for '{group}': {', '.join(opts)}"
    return f"config error: {first} (overrides: {' '.join(overrides)})"


def _valid_keys(parent: str, option: str | None = None) -> list[str]:
    classes = {
        "model": ModelConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "cluster": ClusterConfig,
        "logger": LoggerConfig,
        "eval": EvalConfig,
        "": RootConfig,
    }
    cls = classes.get(parent)
    if parent == "cluster":  # the option's own keys (cluster=slurm adds SLURM resources)
        cls = CLUSTERS.get(option or "local", cls)
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a dict, naming unknown keys and wrong types by path."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key '{where}.{unknown[0]}'. Valid keys under '{where}': "
            f"{', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or value is None:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{where}' got {value!r}; expected {hint}")
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]  # a single value is accepted where a list is expected
        return [_coerce(v, args[0], where) if args else v for v in value]
    if origin is dict:
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"config key '{where}' got {value!r}; expected {hint.__name__}")
    return value


def to_typed(cfg: DictConfig) -> RootConfig:
    """Typed RootConfig from a composed DictConfig (group options pick their own dataclass)."""
    from distft.methods import METHODS
    from distft.strategies import STRATEGIES
    from distft.tuning import TUNINGS

    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    raw.pop("hydra", None)
    plain = {
        "model": ModelConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "cluster": ClusterConfig,
        "logger": LoggerConfig,
        "eval": EvalConfig,
    }
    kwargs: dict[str, Any] = {}
    for key, cls in plain.items():
        block = raw.pop(key, {}) or {}
        if key == "cluster":  # a cluster option may add its own keys (SLURM resources)
            cls = CLUSTERS.get(block.get("name"), cls)
        kwargs[key] = build(cls, block, key)
    for key, registry in (("tuning", TUNINGS), ("method", METHODS), ("strategy", STRATEGIES)):
        block = raw.pop(key, {}) or {}
        name = block.get("name")
        if name not in registry:
            raise ConfigError(f"unknown {key} '{name}'. Valid options: {', '.join(sorted(registry))}")
        kwargs[key] = build(registry[name].config, block, key)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(RootConfig)})
    if unknown:
        raise ConfigError(
            f"unknown config key '{unknown[0]}'. Valid top-level keys: {', '.join(sorted(_valid_keys('')))}"
        )
    cfg_typed = RootConfig(**kwargs, **raw)
    if cfg_typed.strategy.name == "auto":  # the planner picks from the rest of the config
        from distft.plan.auto import resolve_strategy

        cfg_typed = resolve_strategy(cfg_typed)
    validate(cfg_typed)
    return cfg_typed


def load_config(overrides: list[str]) -> tuple[RootConfig, DictConfig]:
    composed = compose(strip_launcher_args(overrides))
    typed = to_typed(composed)
    if composed.strategy.name != typed.strategy.name:  # strategy=auto: config.yaml records the choice
        from omegaconf import open_dict

        with open_dict(composed):
            composed.strategy = OmegaConf.create(dataclasses.asdict(typed.strategy))
    return typed, composed


def validate(cfg: RootConfig) -> None:
    """Cross-field rules, checked before any process group exists."""
    from distft.methods import METHODS
    from distft.strategies import STRATEGIES
    from distft.tuning import TUNINGS

    t = cfg.train
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0 (both are 0)")
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision={t.precision!r}; valid: fp32, bf16, fp16")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        value = getattr(t, key)
        if key == "micro_batch_size" and value == "auto":
            continue  # estimated and confirmed by a trial step in Trainer.build
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{key} must be >= 1 (got {value!r})")
    if t.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine"):
        raise ConfigError(
            f"train.lr_scheduler={t.lr_scheduler!r}; valid: constant, constant_with_warmup, linear, cosine"
        )
    if t.export not in ("last", "best", "none"):
        raise ConfigError(f"train.export={t.export!r}; valid: last, best, none")
    if len(cfg.data.splits) != 3 or cfg.data.splits[0] <= 0 or min(cfg.data.splits) < 0:
        raise ConfigError(
            f"data.splits={cfg.data.splits}: give three non-negative train/val/test ratios "
            "with train > 0, e.g. [8,1,1]"
        )
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(
            f"resume={cfg.resume!r}: no such checkpoint; use auto, never or an existing "
            "checkpoints/step_N path"
        )
    if cfg.model.name_or_path and not _looks_like_hub_id(cfg.model.name_or_path):
        if not Path(cfg.model.name_or_path).is_dir():
            raise ConfigError(
                f"model.name_or_path={cfg.model.name_or_path!r} is not a directory; give a local "
                "Hugging Face model directory or a hub id like 'org/name'"
            )
    _validate_data_eval(cfg, METHODS[cfg.method.name])
    gpu = cfg.cluster.gpus_per_node > 0
    TUNINGS[cfg.tuning.name].validate(cfg)
    METHODS[cfg.method.name].validate(cfg)
    STRATEGIES[cfg.strategy.name].validate(cfg, gpu)


def _validate_data_eval(cfg: RootConfig, method_cls) -> None:
    """data.* cleaning/mixing keys, eval.metrics against the method, early stopping and export=best."""
    from distft.data.clean import check_config
    from distft.data.schemas import FORMATS
    from distft.eval import check_metrics

    d, e, t = cfg.data, cfg.eval, cfg.train
    check_config(d)
    if d.format != "auto" and d.format not in FORMATS:
        raise ConfigError(f"data.format={d.format!r}; valid: auto, {', '.join(FORMATS)}")
    if d.weights and (len(d.weights) != len(d.path) or min(d.weights) < 0 or sum(d.weights) <= 0):
        raise ConfigError(
            f"data.weights={d.weights} must give one non-negative weight per data.path entry "
            f"({len(d.path)}), not all zero"
        )
    check_metrics(cfg, method_cls)
    if e.mode not in ("auto", "min", "max"):
        raise ConfigError(f"eval.mode={e.mode!r}; valid: auto, min, max")
    if e.patience < 0 or e.min_delta < 0:
        raise ConfigError("eval.patience and eval.min_delta must be >= 0")
    wanted = (("eval.patience>0", e.patience > 0), ("train.export=best", t.export == "best"))
    needs = [k for k, on in wanted if on]
    if needs and (t.eval_every <= 0 or d.splits[1] <= 0):
        raise ConfigError(
            f"{' and '.join(needs)} need periodic validation: set train.eval_every > 0 and a val "
            f"ratio in data.splits (now eval_every={t.eval_every}, splits={d.splits})"
        )
    if not (e.monitor in ("eval/loss", "eval/ppl") or e.monitor.startswith("eval/")):
        raise ConfigError(f"eval.monitor={e.monitor!r}; give eval/loss, eval/ppl or eval/<metric>")


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and not Path(name).exists()
