"""Stability diagnostics used during training: Amax gain magnitude, coefficient statistics."""

from torch_mhc.diagnostics.collect import collect_diagnostics, grad_norms_by_group, record_coefficients
from torch_mhc.diagnostics.gains import (
    amax_gains,
    backward_gain,
    coefficient_stats,
    composites,
    distance_from_uniform,
    forward_gain,
)

__all__ = [
    "amax_gains",
    "backward_gain",
    "coefficient_stats",
    "collect_diagnostics",
    "composites",
    "distance_from_uniform",
    "forward_gain",
    "grad_norms_by_group",
    "record_coefficients",
]
