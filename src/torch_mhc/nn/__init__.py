"""Connections, Sinkhorn and stream helpers (the reference path)."""

from torch_mhc.nn.connections import (
    ConnectionState,
    HyperConnection,
    ManifoldHyperConnection,
    Residual,
    StreamConnection,
    chain_reads,
    chained_backward,
)
from torch_mhc.nn.sinkhorn import sinkhorn
from torch_mhc.nn.streams import HyperHead, expand_streams, merge_streams

__all__ = [
    "ConnectionState",
    "HyperConnection",
    "HyperHead",
    "ManifoldHyperConnection",
    "Residual",
    "StreamConnection",
    "chain_reads",
    "chained_backward",
    "expand_streams",
    "merge_streams",
    "sinkhorn",
]
