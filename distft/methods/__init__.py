"""Training methods: each a class with `config`, `validate`, `default_rows`, `encode`, `collate`,
`loss` and `evaluate`, picked by name; the engine never branches on the method."""

from distft.methods.classify import Classify
from distft.methods.sft import SFT

METHODS: dict[str, type] = {"sft": SFT, "classify": Classify}
