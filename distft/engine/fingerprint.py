"""What a checkpoint was trained with, and whether this run may continue it.

Every checkpoint's trainer_state.json carries a fingerprint of the run that wrote it: the model's
architecture (the tiny model's keys, or a local model's config.json hash), the tuning and its
settings, the method, the strategy, the train and data settings (with the data files' sizes and
mtimes) and the trainable parameters' names and shapes. Before any model is built, a resume
compares it with this run's config:

- a change that cannot resume (model shape or weights, tuning, method, the trainable set) is
  refused in one line naming the keys that differ and the way out;
- a change that can (lr, max_steps, data, ...) goes on, printed and noted in notes.txt.

config.yaml is written only once the run is accepted; the config it replaces is kept as
config_history/<n>.yaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from distft.errors import ConfigError

VERSION = 1
# Keys that never change what a checkpoint holds (runtime switches, labels).
_MODEL_RUNTIME = {"name", "attn_implementation", "trust_remote_code", "kernels"}
_TUNING_RUNTIME = {"merge_on_export"}
HISTORY = "config_history"


def _plain(obj) -> dict:
    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    return json.loads(json.dumps(d, default=str))  # tuples → lists, exotic values → str


def _model_section(model_cfg) -> dict:
    cfg = _plain(model_cfg)
    path = cfg.get("name_or_path")
    if not path:  # the tiny model: its keys are its architecture and its initial weights
        return {k: v for k, v in cfg.items() if k not in _MODEL_RUNTIME}
    out = {"name_or_path": path}
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        out["name_or_path"] = str(local.resolve())
        config = json.loads((local / "config.json").read_text())
        for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache"):
            config.pop(volatile, None)
        blob = json.dumps(config, sort_keys=True).encode()
        out["config_sha256"] = hashlib.sha256(blob).hexdigest()[:16]
    return out


def _data_files(paths: list[str]) -> str:
    """Sizes and mtimes of the data files: a change of content under the same path is seen."""
    parts = []
    for spec in paths:
        p = Path(spec).expanduser()
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.exists() else []
        parts += [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def of_config(cfg) -> dict:
    """The fingerprint of this run's config (before cfg is changed by the build)."""
    data = _plain(cfg.data)
    data["files"] = _data_files(list(cfg.data.path))
    return {
        "version": VERSION,
        "model": _model_section(cfg.model),
        "tuning": {k: v for k, v in _plain(cfg.tuning).items() if k not in _TUNING_RUNTIME},
        "method": _plain(cfg.method),
        "strategy": _plain(cfg.strategy),
        "train": _plain(cfg.train),
        "data": data,
    }


def trainable_shapes(model) -> dict[str, list[int]]:
    """Names and shapes of the parameters that train (the unwrapped model, before sharding)."""
    # ds_shape: a weight ZeRO-3 partitioned at construction (its data is empty)
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _blocking(key: str) -> bool:
    """A difference in this key means the checkpoint cannot be continued."""
    return key.startswith(("model.", "tuning.")) or key == "method.name"


def differences(saved: dict, mine: dict) -> tuple[list[str], list[str]]:
    """(blocking, other) differences as 'key: old → new' lines."""
    a, b = _flat({k: v for k, v in saved.items() if k != "params"}), _flat(mine)
    # Another option of a group (tuning=lora after full): its name says it, not each of its keys.
    names = (".name", ".name_or_path")
    renamed = {k.rpartition(".")[0] for k in set(a) | set(b) if k.endswith(names) and a.get(k) != b.get(k)}
    blocking, other = [], []
    for key in sorted(set(a) | set(b)):
        if key == "version" or a.get(key) == b.get(key):
            continue
        if key.rpartition(".")[0] in renamed and not key.endswith(names):
            continue
        line = f"{key}: {a.get(key, '<unset>')} → {b.get(key, '<unset>')}"
        (blocking if _blocking(key) else other).append(line)
    return blocking, other


def _way_out(run_dir: Path) -> str:
    export = run_dir / "export"
    weights = str(export) if export.is_dir() else "<an export of that run>"
    return (
        f"train with this config in a new run dir (output_dir=<new dir>), or start over from the "
        f"trained weights: output_dir=<new dir> resume=never model.name_or_path={weights}"
    )


def check(cfg, state: dict, path: Path, run_dir: Path) -> tuple[dict, list[str]]:
    """Compare the checkpoint `state` (trainer_state.json) with this run's config. Raises
    ConfigError for a change that cannot resume; returns (this run's fingerprint, notes)."""
    mine = of_config(cfg)
    saved = state.get("fingerprint")
    if saved is None:  # written before fingerprints: only the names trainer_state.json has
        if state.get("tuning") not in (None, cfg.tuning.name):
            raise ConfigError(
                f"resume: {path} was trained with tuning={state['tuning']}, this run asks for "
                f"tuning={cfg.tuning.name}; a checkpoint continues only with its own tuning: "
                f"{_way_out(run_dir)}"
            )
        note = f"{path.name} has no fingerprint (older distft): its model and data are not checked"
        return mine, [note]
    blocking, other = differences(saved, mine)
    if blocking:
        shown = "; ".join(blocking[:6]) + (f"; and {len(blocking) - 6} more" if len(blocking) > 6 else "")
        raise ConfigError(
            f"resume: {path} was trained with another model, tuning or method ({shown}); a checkpoint "
            f"cannot continue with a different one: {_way_out(run_dir)}"
        )
    notes = [f"resumed {path.name} with changed settings: " + "; ".join(other)] if other else []
    return mine, notes


def check_params(model, state: dict, path: Path, run_dir: Path) -> dict[str, list[int]]:
    """After the tuning is applied (before sharding): the trainable parameters must be the ones the
    checkpoint holds (a model directory replaced under the same path shows up here)."""
    mine = trainable_shapes(model)
    saved = (state.get("fingerprint") or {}).get("params")
    if saved is None or saved == mine:
        return mine
    names = sorted(set(saved) | set(mine))
    diff = [
        f"{n}: {saved.get(n, 'absent')} → {mine.get(n, 'absent')}"
        for n in names
        if saved.get(n) != mine.get(n)
    ]
    raise ConfigError(
        f"resume: {path} holds other trainable parameters than this model ({len(diff)} differ, e.g. "
        f"{'; '.join(diff[:3])}): {_way_out(run_dir)}"
    )


def accept(cfg, run_dir: Path, info, resume_path: Path | None) -> dict:
    """The resume check on every rank (no collective: each reads the same trainer_state.json);
    rank 0 prints the accepted differences and notes them in notes.txt. Returns the fingerprint
    this run's checkpoints will carry."""
    if resume_path is None:
        return of_config(cfg)
    state = json.loads((resume_path / "trainer_state.json").read_text())
    mine, notes = check(cfg, state, resume_path, run_dir)
    if info.is_main and notes:
        with open(run_dir / "notes.txt", "a") as f:
            for note in notes:
                print(f"distft: {note}", flush=True)
                f.write(note + "\n")
    return mine


# ------------------------------------------------------------------ config.yaml and its history
def previous_config(run_dir: Path) -> str | None:
    path = run_dir / "config.yaml"
    return path.read_text() if path.is_file() else None


def archive_config(run_dir: Path, previous: str | None) -> Path | None:
    """Keep the config.yaml this run replaced (when it differs) as config_history/<n>.yaml."""
    if previous is None or previous == previous_config(run_dir):
        return None
    folder = run_dir / HISTORY
    folder.mkdir(exist_ok=True)
    n = 1 + max((int(p.stem) for p in folder.glob("*.yaml") if p.stem.isdigit()), default=0)
    out = folder / f"{n}.yaml"
    out.write_text(previous)
    return out
