"""Parallelism on one device mesh beyond data parallelism (tensor, context)."""
