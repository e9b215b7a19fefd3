"""`distft-plan [overrides]`: per-rank memory estimate for every strategy and several world sizes,
and the strategy `strategy=auto` would pick. Takes the same Hydra overrides as training.

    distft-plan model.hidden_size=768 model.num_layers=10 train.micro_batch_size=8
    distft-plan model.name_or_path=meta-llama/Llama-3.1-8B tuning=qlora cluster.gpus_per_node=8
"""

from __future__ import annotations

import dataclasses
import json
import sys

from distft.errors import DistftError
from distft.plan.memory import GIB
from distft.strategies import AUTO_ORDER, PLANNED, shipped_config

COLUMNS = ["params", "grads", "optimizer", "activations", "activations_ckpt", "buffers", "runtime"]


def table(cfg, worlds: list[int]) -> tuple[list[dict], dict]:
    from distft.plan.auto import budget, plan_one, valid_strategies, world_size
    from distft.plan.shape import model_shape

    shape = model_shape(cfg)
    micro = cfg.train.micro_batch_size
    micro = 1 if micro == "auto" else int(micro)
    seq = cfg.data.max_length
    rows = []
    for s in valid_strategies(cfg):
        for w in worlds:
            e = plan_one(cfg, shape, s, w, micro, seq)
            rows.append(e.as_dict() | {"notes": e.notes})
    limit, source = budget(cfg)
    meta = {
        "params": shape.params,
        "trainable": shape.trainable,
        "micro": micro,
        "seq": seq,
        "world": world_size(cfg),
        "budget_gib": limit / GIB,
        "budget_source": source,
    }
    return rows, meta


def render(rows: list[dict], meta: dict, cfg, chosen: str | None, micro_auto: int | None) -> str:
    head = (
        f"model: {meta['params'] / 1e6:.2f}M parameters, {meta['trainable'] / 1e6:.2f}M trainable "
        f"(tuning={cfg.tuning.name}), precision={cfg.train.precision}, micro-batch {meta['micro']} × "
        f"{meta['seq']} tokens, gradient checkpointing "
        f"{'on' if cfg.train.gradient_checkpointing else 'off'}\n"
        f"budget: {meta['budget_gib']:.1f} GiB per rank ({meta['budget_source']}); GiB per rank below\n"
    )
    cols = [
        "strategy",
        "ranks",
        "params",
        "grads",
        "optim",
        "act",
        "act(ckpt)",
        "buffers",
        "runtime",
        "total",
    ]
    lines = [" ".join(f"{c:>9}" for c in cols)]
    for r in rows:
        vals = [r["strategy"], r["world"]] + [f"{r[k]:.3f}" for k in COLUMNS] + [f"{r['total_gib']:.3f}"]
        mark = "  *" if r["strategy"] == chosen and r["world"] == meta["world"] else ""
        lines.append(" ".join(f"{str(v):>9}" for v in vals) + mark)
    out = head + "\n".join(lines) + "\n"
    if chosen:
        out += (
            f"recommended at {meta['world']} ranks: strategy={chosen} "
            "(*: the fastest that fits in 90% of the budget)"
        )
        if meta.get("mesh"):
            out += f"\nmesh: {meta['mesh']}"
    if micro_auto:
        out += f"\nlargest micro-batch that fits by the estimate: train.micro_batch_size={micro_auto}"
    return out + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from distft.config.cli import early_exit

    if (rc := early_exit("distft-plan", __doc__, argv, flags="[--json]")) is not None:  # --help, --cfg job
        return rc
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    try:
        from distft.config.load import compose, to_typed

        composed = compose(argv)
        if composed.strategy.name == PLANNED:  # show the whole table, then the pick
            composed.strategy = dataclasses.asdict(shipped_config(AUTO_ORDER[0]))
        cfg = to_typed(composed)
        from distft.plan.auto import pick_micro, pick_strategy, world_size
        from distft.plan.shape import model_shape

        world = world_size(cfg)
        worlds = sorted({1, 2, 4, 8, world})
        rows, meta = table(cfg, worlds)
        shape = model_shape(cfg)
        chosen_cfg, _ = pick_strategy(cfg, shape, world, cfg.data.max_length)
        from distft.plan.mesh import mesh_of

        meta["mesh"] = str(mesh_of(chosen_cfg, world))
        micro_auto = None
        if cfg.train.micro_batch_size == "auto":
            from dataclasses import replace

            micro_auto = pick_micro(replace(cfg, strategy=chosen_cfg), shape, world, cfg.data.max_length)
    except DistftError as e:
        print(f"distft-plan: error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"meta": meta, "rows": rows, "recommended": chosen_cfg.name, "micro": micro_auto}))
    else:
        print(render(rows, meta, cfg, chosen_cfg.name, micro_auto), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
