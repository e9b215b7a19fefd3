"""The contracts between the engine and its parts (distft/contracts.py): every registered part
fulfils its protocol, strategy knowledge stays inside the strategies (no strategy names in the
engine, methods, tuning or planner; the planner covers every strategy, hsdp included), the engine
does not probe its parts with hasattr, and the one optimizer step normalizes by the global
target count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from distft.config.load import load_config
from distft.contracts import Method, Strategy, StrategyOption, Tuning
from distft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
STRATEGY_NAMES = {"ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3", "zero3_offload"}


@pytest.mark.quick
def test_registries_hold_their_contracts():
    from distft.methods import METHODS
    from distft.strategies import STRATEGIES
    from distft.tuning import TUNINGS

    assert all(issubclass(m, Method) for m in METHODS.values())
    assert all(isinstance(o, StrategyOption) for o in STRATEGIES.values())
    assert all(isinstance(t, Tuning) for t in TUNINGS.values())
    from distft.strategies.deepspeed_zero import DeepSpeedStrategy
    from distft.strategies.torch_native import TorchNativeStrategy

    assert issubclass(DeepSpeedStrategy, Strategy) and issubclass(TorchNativeStrategy, Strategy)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):  # docstrings may name strategies
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            docs.add(id(body[0].value))
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


@pytest.mark.quick
def test_no_strategy_names_outside_the_strategies():
    found = []
    for pkg in ("engine", "methods", "tuning", "plan"):
        for path in (REPO / "distft" / pkg).rglob("*.py"):
            found += [
                f"{path.relative_to(REPO)}:{line}: {s!r}"
                for line, s in _string_constants(path)
                if s in STRATEGY_NAMES
            ]
    assert not found, "strategy names outside distft/strategies:\n" + "\n".join(found)


@pytest.mark.quick
def test_engine_does_not_probe_its_parts():
    """The loop calls what the contracts declare (checkpoint.py is the resume helper's)."""
    probes = []
    for name in ("trainer.py", "finish.py", "build.py", "evaluation.py"):
        tree = ast.parse((REPO / "distft" / "engine" / name).read_text())
        probes += [
            f"{name}:{n.lineno}"
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)
            and n.func.id in ("hasattr", "getattr")
        ]
    assert not probes, probes
    assert len((REPO / "distft/engine/trainer.py").read_text().splitlines()) <= 300


@pytest.mark.quick
def test_planner_covers_every_strategy_including_hsdp():
    from distft.plan import auto, model_shape
    from distft.strategies import AUTO_ORDER, STRATEGIES

    cfg, _ = load_config([])
    shape = model_shape(cfg)
    assert set(AUTO_ORDER) == set(STRATEGIES) - {"auto"}
    world = auto.world_size(cfg)  # one node
    est = {s.name: auto.plan_one(cfg, shape, s, world, 2, 32) for s in auto.valid_strategies(cfg)}
    assert list(est) == AUTO_ORDER
    # hsdp shards within a node: on one node it is fsdp; on 2 nodes it shards over one node's ranks.
    assert est["hsdp"].states == pytest.approx(est["fsdp"].states)
    cfg2, _ = load_config(["cluster.nodes=2", f"cluster.nproc_per_node={world}", "strategy=hsdp"])
    two_nodes = auto.plan_one(cfg2, shape, cfg2.strategy, 2 * world, 2, 32)
    assert two_nodes.states == pytest.approx(est["fsdp"].states)
    fsdp_two_nodes = auto.plan_one(cfg2, shape, auto.strategy_config("fsdp"), 2 * world, 2, 32)
    assert fsdp_two_nodes.states < two_nodes.states


@pytest.mark.quick
def test_strategies_say_which_tunings_they_support():
    from distft.strategies import STRATEGIES, shipped_config

    assert STRATEGIES["zero3"].supports_tuning("dora", shipped_config("zero3"))
    assert STRATEGIES["zero2"].supports_tuning("dora", shipped_config("zero2")) is None
    with pytest.raises(
        ConfigError, match="tuning=prefix does not work with strategy=hsdp.*use strategy=ddp, zero1, zero2$"
    ):
        load_config(["tuning=prefix", "strategy=hsdp"])
    # strategy=auto only considers strategies that support the tuning mode
    from distft.plan import auto

    cfg, _ = load_config(["tuning=prefix"])
    assert {s.name for s in auto.valid_strategies(cfg)} == {"ddp", "zero1", "zero2"}


@pytest.mark.quick
def test_optimizer_step_normalizes_by_the_global_target_count():
    """Micro-batch losses are sums; the step's gradient is their total over the step's targets."""
    from distft.runtime import dist
    from distft.strategies import STRATEGIES
    from distft.strategies.step import BatchGeometry, optimizer_step

    cfg, _ = load_config(["train.max_grad_norm=0", "train.grad_accum=2"])
    info = dist.init()
    assert BatchGeometry.of(cfg, info, micro=4).global_batch == 8 and BatchGeometry(4, 2, 3).unit == 6
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    start = model.weight.detach().clone()
    x = [torch.randn(5, 3), torch.randn(2, 3)]
    batches = [{"x": x[0], "num_targets": 5}, {"x": x[1], "num_targets": 2}]

    def loss_fn(m, b):
        return (m(b["x"]) ** 2).sum(), {"seen": (b["num_targets"], 1)}

    ref = torch.nn.Linear(3, 1, bias=False)
    ref.weight.data.copy_(start)
    ((ref(torch.cat(x)) ** 2).sum() / 7).backward()
    strategy = STRATEGIES["ddp"].make(cfg, info)
    strategy.setup(model)
    trial = optimizer_step(strategy, batches, loss_fn, info.device, None, trial=True)
    assert torch.equal(model.weight.grad, torch.zeros_like(start)) and torch.equal(model.weight, start)
    strategy.end_trial(4)
    out = optimizer_step(strategy, batches, loss_fn, info.device, 0.1)
    assert out.grad_norm == pytest.approx(float(ref.weight.grad.norm()), rel=1e-6)
    assert out.loss == pytest.approx(float((ref(torch.cat(x)) ** 2).sum().detach() / 7), rel=1e-6)
    assert out.metrics == {"seen": pytest.approx(3.5)} and trial.loss == pytest.approx(out.loss * 7, rel=1e-6)
    assert not torch.equal(model.weight, start)
