"""Models and tokenizers: transformers Auto* from a hub id or local directory, or the tiny default."""

from distft.models.loader import base_dtype, load_model, load_tokenizer, resolve_model_path

__all__ = ["base_dtype", "load_model", "load_tokenizer", "resolve_model_path"]
