"""``apply_mhc_kernels(model)``: this project's mHC modules and kernels inside transformers' DeepSeek-V4.

In the spirit of Liger-Kernel's ``apply_liger_kernel_to_*``: a ``deepseek_v4`` model (transformers
>= 5.10) is patched in place. Each decoder layer's ``attn_hc`` and ``ffn_hc`` become a
:class:`~torch_mhc.nn.ManifoldHyperConnection` (``variant="deepseek-v4"``) that holds the layer's
own ``fn``, ``base`` and ``scale`` parameters (same objects, names, shapes and fp32 dtype), and the
layer's forward runs ``pre`` -> sublayer -> ``post`` through it; ``hc_head`` becomes a
:class:`~torch_mhc.nn.HyperHead` over ``hc_fn``, ``hc_base``, ``hc_scale``. The state dict keys do
not change, so checkpoints load and save as before and an optimizer built earlier still holds the
parameters.

What changes: the Sinkhorn backward is the exact hand-written one (the logits are saved, the
iterations recomputed) instead of autograd through 20 unrolled iterations; on CUDA with Triton
the coefficients, collapse and expand/mix run as the fused kernels of :mod:`torch_mhc.ops`; the
expand/mix ``post * F + comb^T x`` accumulates in fp32 (transformers computes it in the model
dtype), so in bf16 the results differ by rounding, and in fp32/fp64 on the reference path they
agree with transformers' own modules.
"""

from __future__ import annotations

import types

from torch import nn

from torch_mhc.nn import HyperHead, ManifoldHyperConnection, chain_reads


class DeepseekV4HyperHead(HyperHead):
    """:class:`HyperHead` on transformers' ``DeepseekV4HyperHead`` parameters, under their names
    (``hc_fn [n, n*dim]``, ``hc_base [n]``, ``hc_scale [1]``)."""

    DECAYED = ("hc_fn",)
    fn = property(lambda self: self.hc_fn)
    base = property(lambda self: self.hc_base)
    scale = property(lambda self: self.hc_scale)

    def __init__(self, head: nn.Module):
        nn.Module.__init__(self)
        self.n, self.eps, self.scale_init = head.hc_mult, head.eps, 1.0
        self.dim = head.hc_fn.shape[1] // head.hc_mult
        self.hc_fn, self.hc_base, self.hc_scale = head.hc_fn, head.hc_base, head.hc_scale


def connection_from_v4(hc: nn.Module, config) -> ManifoldHyperConnection:
    """A ManifoldHyperConnection holding ``hc``'s own fn, base and scale parameters."""
    conn = ManifoldHyperConnection(config.hidden_size, config.hc_mult, sinkhorn_iters=config.hc_sinkhorn_iters,
                                   eps=config.hc_eps, bias_init="zero", variant="deepseek-v4")
    conn.fn, conn.base, conn.scale = hc.fn, hc.base, hc.scale
    return conn


def _decoder_layer_forward(self, hidden_states, input_ids=None, **kwargs):
    """``DeepseekV4DecoderLayer.forward`` with the connections' pre/post: streams ``[B, S, n, D]``."""
    collapsed, state = self.attn_hc.pre(hidden_states)
    attn_output, _ = self.self_attn(self.input_layernorm(collapsed), **kwargs)
    hidden_states = self.attn_hc.post(state, attn_output)
    collapsed, state = self.ffn_hc.pre(hidden_states)
    mlp_output = self.mlp(self.post_attention_layernorm(collapsed), input_ids=input_ids)
    return self.ffn_hc.post(state, mlp_output)


def apply_mhc_kernels(model: nn.Module) -> nn.Module:
    """Patch a transformers ``DeepseekV4Model`` / ``DeepseekV4ForCausalLM`` in place (idempotent);
    returns ``model``. Raises ValueError for other models and for configs whose ``rms_norm_eps``
    (V4's norm inside the connections) differs from ``hc_eps`` (ours uses one eps for both)."""
    from torch_mhc.integrations import require_transformers

    require_transformers()
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    base = model.model if isinstance(model, v4.DeepseekV4ForCausalLM) else model
    if not isinstance(base, v4.DeepseekV4Model):
        raise ValueError(f"apply_mhc_kernels expects a transformers DeepSeek-V4 model, got {type(model).__name__}")
    config = base.config
    if config.rms_norm_eps != config.hc_eps:
        raise ValueError(f"apply_mhc_kernels needs rms_norm_eps == hc_eps (got {config.rms_norm_eps} and "
                         f"{config.hc_eps}): torch_mhc's connections use one eps for the norm and for Sinkhorn")
    for layer in base.layers:
        if isinstance(layer.attn_hc, v4.DeepseekV4HyperConnection):
            layer.attn_hc = connection_from_v4(layer.attn_hc, config)
            layer.ffn_hc = connection_from_v4(layer.ffn_hc, config)
            layer.forward = types.MethodType(_decoder_layer_forward, layer)
    if isinstance(base.hc_head, v4.DeepseekV4HyperHead):
        base.hc_head = DeepseekV4HyperHead(base.hc_head)
    chain_reads([c for layer in base.layers for c in (layer.attn_hc, layer.ffn_hc)])  # read-ahead (design.md)
    return model
