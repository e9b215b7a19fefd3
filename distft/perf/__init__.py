"""Performance accounting: model FLOPs per token, device peaks, MFU, memory readings."""
