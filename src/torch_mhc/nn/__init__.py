"""Connections, H_res maps, Sinkhorn and stream helpers (the reference path)."""

from torch_mhc.nn.connections import (
    ConnectionState,
    HyperConnection,
    ManifoldHyperConnection,
    Residual,
    StreamConnection,
    called_plainly,
    chained_backward,
    forward_ahead_of,
    run_chain,
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
    "called_plainly",
    "chained_backward",
    "expand_streams",
    "forward_ahead_of",
    "make_h_res",
    "merge_streams",
    "run_chain",
    "sinkhorn",
]
