"""Imports every rank needs before it can load a model, done on all ranks at once.

The tiny default base is built by rank 0 while the other ranks wait at a barrier; rank 0's build
imports transformers' tokenizer and model stack (seconds), and the others used to import the same
modules only after the barrier, one after the other instead of side by side. Importing them on
every rank first makes those seconds parallel. Nothing here has side effects beyond the imports.
"""

from __future__ import annotations


def model_stack(cfg) -> None:
    """transformers' tokenizer, model and generation modules (and the Llama family the tiny base
    uses, when the job builds it), imported now on this rank."""
    import transformers.generation  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    import transformers.tokenization_utils_tokenizers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if not cfg.model.name_or_path:  # the tiny base: a Llama
        import transformers.models.llama.modeling_llama  # noqa: F401
