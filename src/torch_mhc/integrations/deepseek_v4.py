"""``apply_mhc_kernels(model)``: this project's mHC modules and kernels inside transformers' DeepSeek-V4.

In the spirit of Liger-Kernel's ``apply_liger_kernel_to_*``: a ``deepseek_v4`` model (transformers
>= 5.10) is patched in place. Each decoder layer's ``attn_hc`` and ``ffn_hc`` become a
:class:`DeepseekV4Connection` (a :class:`~torch_mhc.nn.ManifoldHyperConnection`, ``variant="deepseek-v4"``)
that holds the layer's own ``fn``, ``base`` and ``scale`` parameters (same objects, names, shapes and
fp32 dtype); ``hc_head`` becomes a :class:`DeepseekV4HyperHead` over ``hc_fn``, ``hc_base``, ``hc_scale``.
Each decoder layer's class becomes ``MhcDeepseekV4DecoderLayer``, a subclass of transformers' layer
whose ``forward`` runs ``pre`` -> sublayer -> ``post`` through the connections; being a subclass, its
forward is wrapped by transformers' gradient checkpointing like the original's. The state dict keys
do not change, so checkpoints load and save as before (``from_pretrained`` builds the plain model:
patch it again) and an optimizer built earlier still holds the parameters.

Every transformers feature stays: gradient checkpointing (the layer recomputes under
``gradient_checkpointing_enable``), ``init_weights()`` (the model's ``_init_weights`` hands the
swapped modules to their ``reset_parameters``, which draw exactly what transformers' own init
draws, so a meta-device build + ``to_empty`` + ``init_weights()`` initialises them), separate
``rms_norm_eps`` (the RMS norm inside the connections) and ``hc_eps`` (``H_pre`` and Sinkhorn),
``save_pretrained``/``from_pretrained``, ``generate`` with its cache.

What changes: the Sinkhorn backward is the exact hand-written one (the logits are saved, the
iterations recomputed) instead of autograd through 20 unrolled iterations; on CUDA with Triton
the coefficients, collapse and expand/mix run as the fused kernels of :mod:`torch_mhc.ops`; the
expand/mix ``post * F + comb^T x`` accumulates in fp32 (transformers computes it in the model
dtype), so in bf16 the results differ by rounding, and in fp32/fp64 on the reference path they
agree with transformers' own modules. With ``rms_norm_eps != hc_eps`` the coefficients are computed
from the streams scaled by ``sqrt(hc_eps / rms_norm_eps)`` (an RMS norm with ``hc_eps`` of ``c x`` is
one with ``rms_norm_eps`` of ``x``), and the kernels' read-ahead is off for those connections. The read-ahead
is handed from each layer's attention post to its FFN read; transformers' loop over the layers hands on only the
streams, so each layer's first read computes its own coefficient GEMM.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from torch_mhc.nn import HyperHead, ManifoldHyperConnection
from torch_mhc.numerics import compute_dtype

LAYER_CLASS_NAME = "MhcDeepseekV4DecoderLayer"


def norm_eps_scale(norm_eps: float, eps: float) -> float:
    """``c`` such that an RMS norm with ``eps`` of ``c x`` equals one with ``norm_eps`` of ``x``:
    ``c x / sqrt(c^2 m + eps) = x / sqrt(m + eps / c^2)``, so ``c = sqrt(eps / norm_eps)``."""
    if norm_eps <= 0 or eps <= 0:
        raise ValueError(f"different norm and hyper-connection eps must both be > 0 (got rms_norm_eps={norm_eps}, "
                         f"hc_eps={eps})")
    return math.sqrt(eps / norm_eps)


def _rescaled(streams: torch.Tensor, norm_eps: float, eps: float) -> torch.Tensor:
    """streams ``[..., n, D]`` in the compute dtype, scaled by :func:`norm_eps_scale` (for the norm only)."""
    return streams.to(compute_dtype(streams.dtype)) * norm_eps_scale(norm_eps, eps)


@torch.no_grad()
def _v4_init(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, std: float, generator=None) -> None:
    """transformers' init of V4's hyper-connection parameters (``_init_weights``): fn ~ N(0, std^2),
    base 0, scale 1; parameters flagged as loaded (``_is_hf_initialized``) are left alone."""
    from transformers import initialization as init

    init.normal_(fn, mean=0.0, std=std, generator=generator)
    init.zeros_(base)
    init.ones_(scale)


class DeepseekV4Connection(ManifoldHyperConnection):
    """A ManifoldHyperConnection (``variant="deepseek-v4"``) with V4's two epsilons: ``norm_eps``
    (``rms_norm_eps``, the RMS norm of the flattened streams) and ``eps`` (``hc_eps``, ``H_pre`` and
    Sinkhorn); ``init_std`` is the config's ``initializer_range`` (``reset_parameters``: V4's init)."""

    def __init__(self, dim: int, n: int, *, sinkhorn_iters: int, eps: float, norm_eps: float, init_std: float):
        self.norm_eps, self.init_std = norm_eps, init_std
        if norm_eps != eps:
            norm_eps_scale(norm_eps, eps)  # raises for an eps <= 0
        with torch.device("meta"):  # the parameters are set by the caller or by reset_parameters: draw nothing here
            super().__init__(dim, n, sinkhorn_iters=sinkhorn_iters, eps=eps, bias_init="v4", phi_std=init_std,
                             alpha_init=1.0, variant="deepseek-v4")

    @classmethod
    def from_v4(cls, hc: nn.Module, config) -> DeepseekV4Connection:
        """A connection holding ``hc``'s (a ``DeepseekV4HyperConnection``) own fn, base and scale."""
        conn = cls(config.hidden_size, config.hc_mult, sinkhorn_iters=config.hc_sinkhorn_iters, eps=config.hc_eps,
                   norm_eps=config.rms_norm_eps, init_std=config.initializer_range)
        conn.fn, conn.base, conn.scale = hc.fn, hc.base, hc.scale
        return conn

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """V4's init, as transformers' ``_init_weights`` does it (the same draws from the same generator)."""
        _v4_init(self.fn, self.base, self.scale, self.init_std, generator)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}, norm_eps={self.norm_eps}"

    def coefficients_are_base(self) -> bool:
        """When the two eps agree, ``coefficients`` below is the base's own function: the read may be fused."""
        return self.norm_eps == self.eps

    def coefficients(self, streams):
        if self.norm_eps == self.eps:
            return super().coefficients(streams)
        self.check_streams(streams)
        return super().coefficients(_rescaled(streams, self.norm_eps, self.eps))


def connection_from_v4(hc: nn.Module, config) -> DeepseekV4Connection:
    """A :class:`DeepseekV4Connection` holding ``hc``'s own fn, base and scale parameters."""
    return DeepseekV4Connection.from_v4(hc, config)


class DeepseekV4HyperHead(HyperHead):
    """:class:`HyperHead` on transformers' ``DeepseekV4HyperHead`` parameters, under their names
    (``hc_fn [n, n*dim]``, ``hc_base [n]``, ``hc_scale [1]``), with V4's ``norm_eps`` (the RMS norm)
    and ``eps`` (added to the weights)."""

    DECAYED = ("hc_fn",)
    fn = property(lambda self: self.hc_fn)
    base = property(lambda self: self.hc_base)
    scale = property(lambda self: self.hc_scale)

    def __init__(self, head: nn.Module, norm_eps: float | None = None, init_std: float = 0.02):
        nn.Module.__init__(self)
        self.n, self.eps, self.scale_init = head.hc_mult, head.eps, 1.0
        self.norm_eps = head.input_norm.variance_epsilon if norm_eps is None else norm_eps
        if self.norm_eps != self.eps:
            norm_eps_scale(self.norm_eps, self.eps)
        self.init_std = init_std
        self.dim = head.hc_fn.shape[1] // head.hc_mult
        self.hc_fn, self.hc_base, self.hc_scale = head.hc_fn, head.hc_base, head.hc_scale

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """V4's init of the head, as transformers' ``_init_weights`` does it."""
        _v4_init(self.hc_fn, self.hc_base, self.hc_scale, self.init_std, generator)

    def weights(self, streams: torch.Tensor) -> torch.Tensor:
        if self.norm_eps == self.eps:
            return super().weights(streams)
        return super().weights(_rescaled(streams, self.norm_eps, self.eps))


@functools.cache
def decoder_layer_class() -> type:
    """``MhcDeepseekV4DecoderLayer``: transformers' ``DeepseekV4DecoderLayer`` with the connections'
    pre/post in ``forward`` (built once, when transformers is there)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    def forward(self, hidden_states, input_ids=None, **kwargs):
        """streams ``[B, S, n, D]`` -> streams ``[B, S, n, D]``. The attention's post hands the FFN's read its
        read-ahead (fused kernels); transformers' layer loop hands the next layer only the streams."""
        collapsed, state = self.attn_hc.pre(hidden_states)
        attn_output, _ = self.self_attn(self.input_layernorm(collapsed), **kwargs)
        hidden_states, ahead = self.attn_hc.post_ahead(state, attn_output, self.ffn_hc)
        collapsed, state = self.ffn_hc.pre(hidden_states, read_ahead=ahead)
        mlp_output = self.mlp(self.post_attention_layernorm(collapsed), input_ids=input_ids)
        return self.ffn_hc.post(state, mlp_output)

    # a subclass: transformers' GradientCheckpointingLayer wraps its forward for checkpointing
    return type(LAYER_CLASS_NAME, (v4.DeepseekV4DecoderLayer,), {
        "__module__": __name__, "__qualname__": LAYER_CLASS_NAME, "forward": forward,
        "__doc__": "DeepseekV4DecoderLayer running its hyper-connections through torch_mhc (apply_mhc_kernels)."})


def apply_mhc_kernels(model: nn.Module) -> nn.Module:
    """Patch a transformers ``DeepseekV4Model`` / ``DeepseekV4ForCausalLM`` in place (idempotent);
    returns ``model``. Raises ValueError for other models."""
    from torch_mhc.integrations import hook_init_weights, require_transformers

    require_transformers()
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    base = model.model if isinstance(model, v4.DeepseekV4ForCausalLM) else model
    if not isinstance(base, v4.DeepseekV4Model):
        raise ValueError(f"apply_mhc_kernels expects a transformers DeepSeek-V4 model, got {type(model).__name__}")
    config = base.config
    layer_class = decoder_layer_class()
    for layer in base.layers:
        if isinstance(layer.attn_hc, v4.DeepseekV4HyperConnection):
            layer.attn_hc = connection_from_v4(layer.attn_hc, config)
        if isinstance(layer.ffn_hc, v4.DeepseekV4HyperConnection):
            layer.ffn_hc = connection_from_v4(layer.ffn_hc, config)
        if type(layer) is v4.DeepseekV4DecoderLayer:
            layer.__class__ = layer_class
    if isinstance(base.hc_head, v4.DeepseekV4HyperHead):
        base.hc_head = DeepseekV4HyperHead(base.hc_head, config.rms_norm_eps, config.initializer_range)
    hook_init_weights(model, {LAYER_CLASS_NAME})
    return model
