"""What every console script that takes Hydra overrides answers before it parses them:
`-h`/`--help` (what it does, the config groups and their options, the most used keys, where the
full reference is) and `--cfg job` (print the composed config without running, as Hydra does).

    def main(argv=None):
        argv = sys.argv[1:] if argv is None else argv
        if (rc := early_exit("distft-data", __doc__, argv)) is not None:
            return rc
"""

from __future__ import annotations

import inspect
import sys

from distft.paths import conf_dir

REFERENCE = "docs/reference/config.md"
GROUPS = ("model", "tuning", "method", "strategy", "cluster", "data", "eval", "logger", "experiment")
# The keys a first run changes most (with their defaults and one-line docs from the schema).
COMMON_KEYS = (
    "data.path",
    "data.max_length",
    "train.max_steps",
    "train.epochs",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.lr",
    "train.precision",
    "train.save_every",
    "train.eval_every",
    "output_dir",
    "resume",
    "cluster.nproc_per_node",
    "cluster.nodes",
    "cluster.gpus_per_node",
)
HELP_FLAGS = ("-h", "--help")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _key_docs(keys: tuple[str, ...], blocks: dict[str, type]) -> dict[str, tuple[str, str]]:
    """key → (default, first sentence of its docstring), read from the schema dataclasses."""
    import dataclasses

    from distft.config.docstrings import attr_docs as _attr_docs

    out = {}
    for key in keys:
        block, _, name = key.rpartition(".")
        cls = blocks[block]
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = " ".join(_attr_docs(cls).get(name, "").split()).split(". ")[0].rstrip(".")
        doc = doc if len(doc) <= 72 else doc[:71].rsplit(" ", 1)[0] + " ..."
        out[key] = ("null" if default is None else str(default).replace("'", ""), doc)
    return out


def _train_blocks() -> dict[str, type]:
    from distft.config import schema

    return {"": schema.RootConfig, "data": schema.DataConfig, "train": schema.TrainConfig} | {
        "cluster": schema.ClusterConfig
    }


def help_text(
    prog: str,
    doc: str | None,
    flags: str = "",
    groups: tuple[str, ...] = GROUPS,
    keys: tuple[str, ...] = COMMON_KEYS,
    blocks: dict[str, type] | None = None,
    config_name: str = "train",
) -> str:
    """The --help page of a script that takes Hydra overrides."""
    summary = inspect.cleandoc(doc or "").strip()
    from distft.config.load import default_options

    defaults = default_options(config_name)
    lines = [
        f"usage: {prog} [-h] [--cfg job]{' ' + flags if flags else ''} [group=option ...] [key=value ...]",
        "",
        summary,
        "",
        "Config groups (group=option; * marks the default):",
    ]
    for group in groups:
        opts = [f"{o}*" if defaults.get(group) == o else o for o in _options(group)]
        lines.append(f"  {group:<11}{' '.join(opts) or '(none)'}")
    lines += ["", "Most used keys (key=default):"]
    for key, (default, text) in _key_docs(keys, blocks or _train_blocks()).items():
        lines.append(f"  {f'{key}={default}':<32} {text}")
    lines += [
        "",
        "Options:",
        "  -h, --help         show this message and exit",
        "  --cfg job          print the composed config (with your overrides) and exit without running",
        "",
        "Syntax: key=value sets a key, group=option picks an option (tuning=lora), +key=value adds a",
        "key the config lacks, lists and maps as data.path=[a.jsonl,b.jsonl] data.columns={prompt: q}.",
        f"Every key, its type, default and allowed values: {REFERENCE} (python -m distft.docs_ref).",
    ]
    return "\n".join(lines) + "\n"


def cfg_mode(argv: list[str]) -> tuple[str | None, list[str]]:
    """('job'|'all'|None, argv without the --cfg flag) for Hydra's `--cfg job` / `-c job`."""
    for i, arg in enumerate(argv):
        if arg in ("--cfg", "-c") and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--cfg="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def print_composed(overrides: list[str], config_name: str = "train") -> None:
    """The composed config as YAML (interpolations resolved), without validating or running."""
    from omegaconf import OmegaConf

    from distft.config.load import compose

    composed = compose(overrides, config_name)
    plain = OmegaConf.to_container(composed, resolve=True)
    plain.pop("hydra", None)
    print(OmegaConf.to_yaml(plain), end="")


def early_exit(prog: str, doc: str | None, argv: list[str], help: bool = True, **page) -> int | None:
    """Answer --help / --cfg job for a script; None when neither was asked (the script runs).

    `page`: help_text's keywords (flags, groups, keys, blocks, config_name). `help=False` for
    scripts whose argparse prints the help (they give it `epilog()`).
    """
    from distft.errors import DistftError

    if help and any(a in HELP_FLAGS for a in argv):
        print(help_text(prog, doc, **page), end="")
        return 0
    mode, rest = cfg_mode(argv)
    if mode is None:
        return None
    if mode not in ("job", "all"):
        print(f"{prog}: error: --cfg {mode}: valid: job, all", file=sys.stderr)
        return 2
    try:
        print_composed(rest, page.get("config_name", "train"))
    except DistftError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def epilog() -> str:
    """help_text from its groups on: the epilog of argparse-based scripts (distft-verify)."""
    return help_text("x", "").split("\n\n", 2)[2]
