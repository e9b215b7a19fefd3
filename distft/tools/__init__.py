"""Commands beside training: adapter merging and combining (`distft-export`)."""
