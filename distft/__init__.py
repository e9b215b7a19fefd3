"""distft: distributed fine-tuning of language models (SFT, preference and RL methods)
on DeepSpeed ZeRO or FSDP2."""

__version__ = "0.1.0"
