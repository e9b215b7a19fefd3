"""Data: load → split → method-specific encode (tokenize, mask, pack) → global-batch sampler."""
