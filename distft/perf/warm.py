"""Imports every rank needs before it can load a model, done on all ranks at once.

The tiny default base is built by rank 0 while the other ranks wait at a barrier; rank 0's build
imports transformers' tokenizer and model stack (seconds), and the others used to import the same
modules only after the barrier, one after the other instead of side by side. Importing them on
every rank first makes those seconds parallel. Nothing here has side effects beyond the imports.

`deepspeed_muon` imports DeepSpeed's Muon optimizer modules with their `torch.compile`
decorators deferred to the first call: DeepSpeed imports Muon in `initialize`'s optimizer check
and in every ZeRO gradient reduction (to test `isinstance(optimizer, MuonWithAuxAdam)`), and
decorating at import runs `torch.compile`, which imports all of torch's inductor: 3-8 s of a ZeRO
job's first step on CPU, for kernels that only a Muon run calls (they still compile then).
"""

from __future__ import annotations

import functools
import importlib
import sys


def model_stack(cfg) -> None:
    """transformers' tokenizer, model and generation modules (and the Llama family the tiny base
    uses, when the job builds it), imported now on this rank."""
    import transformers.generation  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    import transformers.tokenization_utils_tokenizers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if not cfg.model.name_or_path:  # the tiny base: a Llama
        import transformers.models.llama.modeling_llama  # noqa: F401


MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


def _compile_on_first_call():
    """`torch.compile` as a decorator that compiles when the function is first called."""
    import torch

    def decorate(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)

        return call

    return decorate


def deepspeed_muon() -> None:
    """Import DeepSpeed's Muon modules now, their kernels compiled on first use (see above)."""
    if all(name in sys.modules for name in MUON_MODULES):
        return
    from deepspeed.runtime import compiler

    original = compiler.compile
    compiler.compile = _compile_on_first_call  # read by the modules' decorators while they import
    try:
        for name in MUON_MODULES:
            importlib.import_module(name)
    finally:
        compiler.compile = original
