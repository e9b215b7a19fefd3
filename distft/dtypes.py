"""`train.precision` (and the export tool's --dtype) to torch dtypes: one map for every layer."""

from __future__ import annotations

import torch

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
