"""distft-verify: the equivalence checks, run on a shrunk copy of the user's own config."""
