"""Connections, H_res maps, Sinkhorn and stream helpers (the reference path)."""

from torch_mhc.nn.connections import (
    ConnectionState,
    HyperConnection,
    ManifoldHyperConnection,
    Residual,
    StreamConnection,
    chain_reads,
    chained_backward,
)
from torch_mhc.nn.maps import (
    CirculantMap,
    HResMap,
    IdentityMap,
    KroneckerMap,
    PermutationMixtureMap,
    SinkhornMap,
    make_h_res,
)
from torch_mhc.nn.sinkhorn import sinkhorn
from torch_mhc.nn.streams import HyperHead, expand_streams, merge_streams

__all__ = [
    "CirculantMap",
    "ConnectionState",
    "HResMap",
    "HyperConnection",
    "HyperHead",
    "IdentityMap",
    "KroneckerMap",
    "ManifoldHyperConnection",
    "PermutationMixtureMap",
    "Residual",
    "SinkhornMap",
    "StreamConnection",
    "chain_reads",
    "chained_backward",
    "expand_streams",
    "make_h_res",
    "merge_streams",
    "sinkhorn",
]
