"""Test setup: on a machine without CUDA the Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before the kernels are
imported, which is why it is set here at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Every small test shape is a new tuning key: one pinned config per kernel, so no test benchmarks configs.
    os.environ.setdefault("AMAPO_KERNEL_CONFIG", "first")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
