"""Test-wide setup.

Triton's interpreter must be switched on before any ``@triton.jit`` decorator runs, i.e. before
any test module imports ``kernels.block_attention`` / ``kernels.kv_store``. Without a GPU the
kernels can then run on CPU tensors; with one, the compiled kernels are used.
"""

import os

import torch

if not torch.cuda.is_available():  # idempotent: keeps an explicit user setting
    os.environ.setdefault("TRITON_INTERPRET", "1")
