"""Compose conf/ with Hydra, turn it into typed dataclasses, and check cross-field rules early."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from distft.config import (
    checks,
    resolvers,  # noqa: F401  (the YAML's ${distft_...:} resolvers)
)
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
from distft.config.typed import build
from distft.errors import ConfigError
from distft.paths import conf_dir
from distft.ranges import check_ranges

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


def compose(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides; Hydra's own errors become one clear message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:  # `optional experiment` in the defaults list: Hydra skips a missing one silently
        if (
            o.startswith("experiment=")
            and not (conf_dir() / "experiment" / f"{o.split('=', 1)[1]}.yaml").is_file()
        ):
            opts = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
            raise ConfigError(
                f"unknown option 'experiment/{o.split('=', 1)[1]}'. Valid options for 'experiment': "
                f"{', '.join(opts)}"
            )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name, overrides=open_map_overrides(overrides))
    except OverrideParseException:
        raise ConfigError(_unparsable(overrides)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain_hydra_error(e, overrides)) from None
    except yaml.YAMLError as e:  # a YAML file of conf/ (an experiment, most likely) does not parse
        raise ConfigError(yaml_error_line(e)) from None


def _open_maps() -> tuple[str, ...]:
    """Keys whose value is the user's own map (schema fields typed dict: data.columns, ...)."""
    blocks = {"data": DataConfig, "cluster": ClusterConfig, "train": TrainConfig, "model": ModelConfig}
    blocks |= {"eval": EvalConfig, "logger": LoggerConfig, "": RootConfig}
    hints = {prefix: typing.get_type_hints(cls) for prefix, cls in blocks.items()}
    return tuple(
        f"{prefix}.{name}".lstrip(".")
        for prefix, cls in blocks.items()
        for name, hint in hints[prefix].items()
        if typing.get_origin(hint) is dict
    )


def open_map_overrides(overrides: list[str]) -> list[str]:
    """`data.columns={prompt: question}` and `data.columns.prompt=question` as documented: keys
    inside a user map are the user's, so they are added (Hydra's `++`) rather than refused by the
    struct flag that guards every other key."""
    maps = _open_maps()
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if (
            "=" in o
            and not o.startswith(("+", "~"))
            and any(key == m or key.startswith(m + ".") for m in maps)
        ):
            o = "++" + o
        out.append(o)
    return out


def _unparsable(overrides: list[str]) -> str:
    """Name the first override Hydra's grammar rejects (a stray flag, an unquoted space...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_override(o)
        except HydraException:  # OverrideParseException, or the lexer's own HydraException
            hint = " (flags: -h/--help, --cfg job)" if o.startswith("-") else ""
            return (
                f"cannot read {o!r} as an override{hint}: write key=value or group=option; quote a value "
                "with spaces or special characters as key='a b'"
            )
    return f"cannot read the overrides {' '.join(overrides)!r}; write key=value or group=option"


def yaml_error_line(e: Exception) -> str:
    """'<file>, line L, column C: <problem>' from a PyYAML error (line numbers 1-based)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a conf/ YAML file"
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "") + "; fix that line"


def _explain_hydra_error(e: Exception, overrides: list[str]) -> str:
    """One line from Hydra's exception objects (the option lists and keys they carry, no text parsing)."""
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:  # group=<no such option>
        group = e.missing_cfg_file.split("/")[0]
        options = ", ".join(e.options or [])
        return f"unknown option '{e.missing_cfg_file}'. Valid options for '{group}': {options}"
    name = getattr(e.__cause__, "full_key", None) or getattr(e, "full_key", None)
    if name:  # an override of a key the config lacks (Hydra's cause is OmegaConf's key error)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        option = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{parent}=")), None)
        valid = ", ".join(sorted(_valid_keys(parent, option))) or "(see conf/)"
        elsewhere = _options_with_key(parent, name.rsplit(".", 1)[-1])
        hint = f" ({name} is a key of {', '.join(f'{parent}={o}' for o in elsewhere)})" if elsewhere else ""
        return f"unknown config key '{name}'{hint}. Valid keys under '{parent or '<root>'}': {valid}"
    first = str(e).strip().splitlines()[0]
    return f"config error: {first} (overrides: {' '.join(overrides)})"


def default_options(config_name: str = "train") -> dict[str, str]:
    """group → its default option, from the primary config's defaults list."""
    out = {}
    primary = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{config_name}.yaml"))
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            (group, option), *_ = entry.items()
            out[group.removeprefix("optional ")] = str(option)
    return out


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
    if parent in ("tuning", "method", "strategy"):  # the chosen (or default) option's own dataclass
        from distft.methods import METHODS
        from distft.strategies import STRATEGIES
        from distft.tuning import TUNINGS

        registry = {"tuning": TUNINGS, "method": METHODS, "strategy": STRATEGIES}[parent]
        entry = registry.get(option or default_options().get(parent, ""))
        cls = entry.config if entry is not None else None
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def _options_with_key(parent: str, key: str) -> list[str]:
    """Options of group `parent` whose own dataclass has `key` (strategy.cp: fsdp, hsdp)."""
    if parent not in ("tuning", "method", "strategy"):
        return []
    from distft.methods import METHODS
    from distft.strategies import STRATEGIES
    from distft.tuning import TUNINGS

    registry = {"tuning": TUNINGS, "method": METHODS, "strategy": STRATEGIES}[parent]
    return sorted(n for n, e in registry.items() if key in {f.name for f in dataclasses.fields(e.config)})


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
    from distft.data.stream import check_config as check_streaming
    from distft.methods import METHODS
    from distft.models import kernels
    from distft.strategies import STRATEGIES
    from distft.tuning import TUNINGS

    t = cfg.train
    for key in ("model", "data", "train", "cluster", "eval"):
        check_ranges(getattr(cfg, key), key)  # each field's declared range (distft/ranges.py)
    checks.check_cluster(cfg.cluster)
    checks.check_output_dir(cfg.output_dir)
    checks.check_packing(cfg)
    if t.max_steps == 0 and t.epochs == 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0 (both are 0)")
    if t.micro_batch_size != "auto" and not isinstance(t.micro_batch_size, int):
        raise ConfigError(f"train.micro_batch_size must be >= 1 or auto (got {t.micro_batch_size!r})")
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
    check_streaming(cfg, METHODS[cfg.method.name])
    gpu = cfg.cluster.gpus_per_node > 0
    TUNINGS[cfg.tuning.name].validate(cfg)
    METHODS[cfg.method.name].validate(cfg)
    STRATEGIES[cfg.strategy.name].validate(cfg, gpu)
    kernels.validate(cfg.model, gpu)
    for key in ("tuning", "method", "strategy"):  # after the options' own checks, whose words are kept
        check_ranges(getattr(cfg, key), key)


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
