"""A job's start does no work it does not need (issue 18). In process, no ranks; the ZeRO job's
check (no inductor import) is in tests/test_strategies_multirank.py."""

from __future__ import annotations

import pytest
import torch

from distft.perf import warm


@pytest.mark.quick
def test_compile_on_first_call_defers_torch_compile(monkeypatch):
    """DeepSpeed's Muon kernels are decorated with this instead of torch.compile while they import:
    nothing is compiled (or imported) until a call, then the compiled function runs."""
    compiled = []

    def fake_compile(fn):
        compiled.append(fn)
        return lambda *a, **k: fn(*a, **k) + 1  # tells a compiled call from a plain one

    monkeypatch.setattr(torch, "compile", fake_compile)

    @warm._compile_on_first_call()
    def double(x):
        return 2 * x

    assert compiled == [] and double.__name__ == "double"
    assert double(3) == 7 and double(4) == 9
    assert len(compiled) == 1  # compiled once, on the first call
