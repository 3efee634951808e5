"""Language models built on the connections of :mod:`torch_mhc.nn`."""

from torch_mhc.models.decoder import DecoderLM, KVCache, ModelConfig
from torch_mhc.models.moe import MoE

__all__ = ["DecoderLM", "KVCache", "ModelConfig", "MoE"]
