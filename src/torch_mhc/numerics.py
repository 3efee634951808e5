"""The ground floor: numeric rules and allowed values shared by ``nn/`` (reference path), ``ops/``
(Triton kernels), ``models/`` and the config validation. Imports nothing from the package.
"""

from __future__ import annotations

import torch

# Allowed values, defined once; constructors and config validation both read these.
VARIANTS = ("paper", "deepseek-v4")  # mHC numerics: the paper's, or DeepSeek-V4's released code
BIAS_INITS = ("zero", "identity", "v4")  # mHC init schemes (spec section 4; v4: transformers' DeepSeek-V4)
H_RES_MAPS = ("sinkhorn", "identity", "permutation-mixture", "circulant", "kronecker")  # built-in maps (nn/maps.py)
MAPPINGS = ("pre", "post", "res")  # the three mappings, in the column order of phi
MERGES = ("sum", "mean", "head")  # how the n streams become one before the final norm
SINKHORN_STARTS = ("exp", "softmax")

# Logits above this are shifted down before exp (the shift cancels in the first normalisation).
EXP_SAFE_MAX = 60.0

COL, ROW = 0, 1  # the two Sinkhorn normalisations: divide by column sums, by row sums


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every floating dtype but fp64 (kept for float64 references and gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(t: torch.Tensor):
    """Context that turns autocast off on ``t``'s device: coefficients and Sinkhorn run in fp32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def sinkhorn_start(variant: str) -> str:
    """Starting rule of the variant's Sinkhorn: ``exp`` (paper) or ``softmax`` (DeepSeek-V4)."""
    return "softmax" if variant == "deepseek-v4" else "exp"


def sinkhorn_steps(iters: int, start: str) -> list[int]:
    """The normalisations in order (COL or ROW). ``exp``: ``iters`` x (COL, ROW). ``softmax``: the
    softmax is exp plus the first COL, so one normalisation fewer: ROW, then ``iters - 1`` x (COL, ROW)."""
    return [COL, ROW] * iters if start == "exp" else [ROW] + [COL, ROW] * (iters - 1)
