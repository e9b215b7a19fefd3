"""Typed config: Hydra composes conf/, dataclasses check it (distft.config.load)."""
