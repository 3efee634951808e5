"""Decoder-only language model whose residual connections are one setting: residual, hc or mhc.

Token embedding -> n copied streams -> blocks (attention and FFN/MoE, each a sublayer wrapped by
the configured connection, each with its own RMSNorm inside) -> merge (sum, mean or HyperHead) ->
RMSNorm -> LM head. Rotary attention through ``F.scaled_dot_product_attention`` (causal), with a KV
cache, positions and a padding mask for inference (``generate``); the mHC streams are per token and need none.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from torch_mhc.models.moe import MoE, SwiGLU
from torch_mhc.nn import (
    HyperConnection,
    HyperHead,
    ManifoldHyperConnection,
    Residual,
    StreamConnection,
    expand_streams,
    forward_ahead_of,
    merge_streams,
)
from torch_mhc.nn.maps import make_h_res
from torch_mhc.nn.recompute import optimal_interval, stream_recompute
from torch_mhc.numerics import BIAS_INITS, H_RES_MAPS, MAPPINGS, MERGES, VARIANTS

CONNECTIONS = ("residual", "hc", "mhc")


@dataclass
class ModelConfig:
    vocab_size: int = 256  # embedding rows and logits (at least the tokenizer's vocabulary)
    dim: int = 256  # model width (each residual stream's size)
    n_layers: int = 4  # blocks; each block is two sublayers (attention, FFN)
    n_heads: int = 4  # attention heads; dim / n_heads must be even
    mlp_hidden: int = 0  # 0: 8/3 * dim rounded up to a multiple of 64 (see ffn_hidden)
    max_seq_len: int = 256  # longest context (rotary tables); generation crops to it
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-6  # epsilon of the RMSNorms
    tie_embeddings: bool = False  # the LM head shares the embedding's weight
    init_std: float = 0.02  # std of the weights' normal init (output projections: / sqrt(2 n_layers))
    # residual connection
    connection: str = "mhc"  # the residual connection: residual | hc | mhc
    n_streams: int = 4  # residual streams n (hc, mhc; residual has 1)
    merge: str = "sum"  # how the streams become one before the LM head: sum | mean | head (learned)
    stream_dtype: str = "auto"  # auto (the embedding's dtype) | bfloat16 | float32: dtype of the residual state
    sinkhorn_iters: int = 20  # Sinkhorn-Knopp rounds that make H_res doubly stochastic (mhc)
    mhc_eps: float = 1e-6  # epsilon of the mHC projection's norm and of Sinkhorn
    alpha_init: float = 0.01  # initial alpha, the scale of the dynamic (input-dependent) part of each mapping
    bias_init: str = "identity"  # identity | zero | v4 (ManifoldHyperConnection's init schemes)
    identity_gap: float = 6.0  # bias_init=identity: b_res = g(2I - 1)/2; larger g starts H_res nearer I
    phi_init_std: float = 0.0  # std of mHC's phi at init; 0: 1/sqrt(n*dim) (identity, zero), 0.02 (v4)
    dynamic: bool = True  # mappings depend on the input (phi projections); false: static mappings only
    learn: list[str] = field(default_factory=lambda: ["pre", "post", "res"])  # learned; others fixed: 1/n, 1, I
    variant: str = "paper"  # paper | deepseek-v4
    h_res: str = "sinkhorn"  # mHC's H_res map: sinkhorn | identity | permutation-mixture | circulant | kronecker
    batch_invariant: bool = False  # mhc kernels: a token's outputs and dx are the same bits alone or in any batch
    recompute: bool = False  # selective recompute of the stream states (paper section 4.3)
    recompute_every: int = 0  # keep one state every L_r sublayers; 0: the paper's sqrt(n L / (n + 2))
    # activation checkpointing (applied by the trainer / parallelize, not by the model): none | block (every
    # block keeps only its input and recomputes its forward in backward) | every:K (one block in K)
    activation_checkpoint: str = "none"
    # mixture of experts (DeepSeek-style); off by default
    moe: bool = False
    n_routed_experts: int = 8  # routed experts per MoE layer
    n_shared_experts: int = 1  # experts every token goes through
    top_k: int = 2  # routed experts per token
    expert_hidden: int = 0  # 0: ffn_hidden / 4 (see moe_hidden)
    first_dense_layers: int = 1  # leading blocks with a dense FFN instead of MoE
    moe_bias_rate: float = 1e-3  # step of the routing bias that balances expert load (no auxiliary loss)

    @property
    def ffn_hidden(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.dim / 3 / 64)

    @property
    def moe_hidden(self) -> int:
        return self.expert_hidden or max(1, self.ffn_hidden // 4)

    @property
    def streams(self) -> int:
        return 1 if self.connection == "residual" else self.n_streams

    @property
    def checkpoint_every(self) -> int:
        """``activation_checkpoint`` as an interval: 0 for none, 1 for block, K for every:K (ValueError otherwise)."""
        text = self.activation_checkpoint
        if text == "none":
            return 0
        if text == "block":
            return 1
        head, _, k = text.partition(":")
        if head == "every" and k.isdigit() and int(k) >= 1:
            return int(k)
        raise ValueError(f"activation_checkpoint must be none, block or every:K with an integer K >= 1 (got {text!r})")

    def validate(self) -> None:
        """Raise ValueError naming every impossible setting."""
        errors = []
        if self.recompute_every < 0:
            errors.append(f"recompute_every must be >= 0 (got {self.recompute_every})")
        try:
            self.checkpoint_every
        except (ValueError, AttributeError) as e:
            errors.append(str(e) if isinstance(e, ValueError) else
                          f"activation_checkpoint must be a string (got {self.activation_checkpoint!r})")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "n_streams", "sinkhorn_iters"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_heads >= 1 and self.dim % self.n_heads:
            errors.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        elif self.n_heads >= 1 and (self.dim // self.n_heads) % 2:
            errors.append(f"head dim dim/n_heads ({self.dim // self.n_heads}) must be even for rotary embeddings")
        if self.connection not in CONNECTIONS:
            errors.append(f"connection must be one of {CONNECTIONS} (got {self.connection!r})")
        if self.stream_dtype not in ("auto", "bfloat16", "float32"):
            errors.append(f"stream_dtype must be auto, bfloat16 or float32 (got {self.stream_dtype!r})")
        for name, allowed in (("merge", MERGES), ("bias_init", BIAS_INITS), ("variant", VARIANTS),
                              ("h_res", H_RES_MAPS)):
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.connection == "mhc" and self.h_res in H_RES_MAPS and self.n_streams >= 1:
            try:  # a map's own limits (permutation-mixture: n <= 5)
                make_h_res(self.h_res, self.n_streams)
            except ValueError as e:
                errors.append(f"h_res: {e}")
        if not isinstance(self.learn, (list, tuple)) or set(self.learn) - set(MAPPINGS):
            errors.append(f"learn may only contain {', '.join(MAPPINGS)} (got {self.learn})")
        if self.moe and not 1 <= self.top_k <= self.n_routed_experts:
            errors.append(f"top_k ({self.top_k}) must be between 1 and n_routed_experts ({self.n_routed_experts})")
        if self.mhc_eps < 0 or self.norm_eps < 0:
            errors.append("mhc_eps and norm_eps must be >= 0")
        if not (self.identity_gap >= 0 and self.phi_init_std >= 0):  # also false for NaN
            errors.append(f"identity_gap and phi_init_std must be >= 0 (got {self.identity_gap}, {self.phi_init_std})")
        if errors:
            raise ValueError("invalid model config: " + "; ".join(errors))

    def to_dict(self) -> dict:
        return asdict(self)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[seq_len, head_dim // 2]`` (fp32)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, T, D]``; rotates pairs (x[..., :D/2], x[..., D/2:])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (fp32) of logits ``[B, T, vocab]`` against targets ``[B, T]``."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class KVCache:
    """The keys and values of the tokens seen so far, per attention layer (``[B, H, S, head_dim]`` each): what
    ``DecoderLM.forward(..., cache=...)`` appends to and attends over. ``update`` and ``get_seq_length`` are
    those of transformers' ``DynamicCache``, so the exported model hands its own cache to the same attention."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values ``[B, H, T, D]`` to layer ``layer_idx``'s; return all of them."""
        if layer_idx == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], keys], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], values], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0


class Attention(nn.Module):
    """Pre-norm causal self-attention sublayer: ``[B, T, dim] -> [B, T, dim]``.

    ``cos``, ``sin``: the rotary tables ``[max_seq_len, head_dim / 2]`` (the T tokens at positions 0..T-1), or
    the angles at each token's own position ``[B | 1, 1, T, head_dim / 2]``. ``cache``: a :class:`KVCache` (or
    transformers ``Cache``) holding earlier tokens' keys and values, to which this call's are appended.
    ``mask``: boolean ``[B | 1, 1, T, S + T]``, True where a query may attend a key; None: each query attends
    every earlier key (cached ones included) and itself.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.layer_idx = layer_idx  # this layer's slot in a KV cache
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.qkv(self.norm(x))
        B, T = qkv.shape[:2]  # heads and width from qkv: a tensor-parallel rank holds a share of the heads
        q, k, v = qkv.view(B, T, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        if cos.dim() == 2:
            cos, sin = cos[:T], sin[:T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None and mask is None:  # the training path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            past = k.shape[2] - T
            if mask is None and past and T > 1:  # SDPA's is_causal aligns queries with the first keys, not the last
                mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """Pre-norm FFN sublayer (dense SwiGLU or MoE): ``[..., dim] -> [..., dim]``."""

    def __init__(self, cfg: ModelConfig, use_moe: bool):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if use_moe:
            self.mlp = MoE(cfg.dim, cfg.n_routed_experts, cfg.n_shared_experts, cfg.top_k, cfg.moe_hidden,
                           cfg.moe_bias_rate)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


def make_connection(cfg: ModelConfig, sublayer: nn.Module, layer_index: int) -> nn.Module:
    """Wrap one sublayer in the connection that ``cfg.connection`` names."""
    if cfg.connection == "residual":
        return Residual(cfg.dim, 1, sublayer)
    if cfg.connection == "hc":
        return HyperConnection(cfg.dim, cfg.n_streams, sublayer, layer_index=layer_index, dynamic=cfg.dynamic,
                               learn=tuple(cfg.learn))
    return ManifoldHyperConnection(
        cfg.dim, cfg.n_streams, sublayer, layer_index=layer_index, sinkhorn_iters=cfg.sinkhorn_iters,
        eps=cfg.mhc_eps, alpha_init=cfg.alpha_init, bias_init=cfg.bias_init, identity_gap=cfg.identity_gap,
        phi_std=cfg.phi_init_std or None, dynamic=cfg.dynamic, learn=tuple(cfg.learn), variant=cfg.variant,
        h_res=cfg.h_res, batch_invariant=cfg.batch_invariant,
    )


class Block(nn.Module):
    """Two sublayers, each wrapped: streams ``[B, T, n, dim]`` -> (streams ``[B, T, n, dim]``, read-ahead or None)."""

    def __init__(self, cfg: ModelConfig, block_index: int):
        super().__init__()
        use_moe = cfg.moe and block_index >= cfg.first_dense_layers
        self.attn = make_connection(cfg, Attention(cfg, block_index), 2 * block_index)
        self.ffn = make_connection(cfg, FeedForward(cfg, use_moe), 2 * block_index + 1)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, read_ahead=None, reader=None,
                **attention):
        """``read_ahead``: what the previous block's last post computed for this block's first read (or None);
        ``reader``: the connection that reads this block's output (the next block's :meth:`first_reader`), for
        which the last post computes the returned read-ahead. ``attention``: the attention's ``cache`` and
        ``mask`` (inference; see :class:`Attention`). The attention's post hands its read-ahead to the FFN's read."""
        h, ahead = forward_ahead_of(self.attn, h, cos, sin, read_ahead=read_ahead, reader=self.ffn, **attention)
        return forward_ahead_of(self.ffn, h, read_ahead=ahead, reader=reader)

    def first_reader(self) -> nn.Module | None:
        """The connection that reads this block's input and takes a read-ahead from the previous block (None: the
        previous block computes none; a checkpointed block answers None)."""
        return self.attn


def run_blocks(blocks, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attention) -> torch.Tensor:
    """streams ``[B, T, n, dim]`` through ``blocks`` in order, each block's last post handing the next block's first
    read its read-ahead (the value path; nothing is written into a module). A module in ``blocks`` that is not a
    :class:`Block` is called as ``module(h, cos, sin, **attention) -> streams`` and the read-ahead is dropped on
    both sides of it; a block whose output a hook replaced by a tensor hands none on."""
    blocks = list(blocks)
    ahead = None
    for i, block in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if not isinstance(block, Block):
            h, ahead = block(h, cos, sin, **attention), None
            continue
        reader = nxt.first_reader() if isinstance(nxt, Block) else None
        out = block(h, cos, sin, read_ahead=ahead, reader=reader, **attention)
        if isinstance(out, torch.Tensor):
            h, ahead = out, None
        elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor):
            h, ahead = out
        else:
            raise ValueError(f"block {i} ({type(block).__name__}) returned {type(out).__name__}: a Block returns "
                             "(streams, read-ahead or None), or a forward hook on it may return the streams alone")
    return h


class DecoderLM(nn.Module):
    """``forward(idx [B, T], targets [B, T] | None) -> (logits [B, T, vocab], loss | None)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # The submodules' own initialisation is discarded: reset_parameters() sets every parameter, and the
        # random draws of construction are kept off the global generator, so an eagerly built model and one
        # built on the meta device, materialised with to_empty() and reset, are the same for one seed.
        with torch.random.fork_rng(devices=[]):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
            self.head_merge = HyperHead(cfg.dim, cfg.streams) if cfg.merge == "head" and cfg.streams > 1 else None
            self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        half = (cfg.dim // cfg.n_heads) // 2
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False)
        if not self.embed.weight.is_meta:  # on meta: to_empty(device=...), then reset_parameters()
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter and buffer (also after ``to_empty()`` of a meta-built model).

        The trunk (embedding, sublayers, final norm, head; ``parameter_roles`` != connection) draws from the
        global generator in a fixed order that does not depend on the connection type: Normal(0, init_std)
        for matrices, output projections at ``init_std / sqrt(2 * n_layers)``, norm gains at 1. So one seed
        gives residual, HC and mHC models the same trunk. Then one number drawn from the global generator
        seeds a generator of the connections' own, from which each connection (depth order) and the head
        merge reset their parameters. RoPE tables are recomputed and MoE balancing state cleared.
        """
        if self.cfg.tie_embeddings:  # (again: to_empty() unties shared parameters)
            self.lm_head.weight = self.embed.weight
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        roles = self.parameter_roles()
        for name, p in self.named_parameters():
            if roles[name][0] == "connection":
                continue
            if name.endswith(("proj.weight", "w2.weight", ".w2")):
                nn.init.normal_(p, std=out_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=std)
            else:
                nn.init.ones_(p)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), device="cpu")))
        for conn in self.connections():
            conn.reset_parameters(generator)
        if self.head_merge is not None:
            self.head_merge.reset_parameters(generator)
        with torch.device("cpu"):
            cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers():
            moe.reset_balance()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """Inference may add: ``cache`` (a :class:`KVCache`: idx ``[B, T]`` then holds only the tokens after the
        S cached ones), ``attention_mask`` ``[B, S + T]`` (1 for a token, 0 for padding, over the cached and new
        tokens), ``position_ids`` ``[B | 1, T]`` (default: the number of tokens before each one)."""
        h = self.enter_streams(idx)
        cos, sin, attention = self.rope_cos, self.rope_sin, {}
        if cache is not None or attention_mask is not None or position_ids is not None:
            cos, sin, attention = self.attention_inputs(idx.shape[1], cache, attention_mask, position_ids)
        with self._recompute_context():
            h = run_blocks(self.blocks, h, cos, sin, **attention)
        logits = self.leave_streams(h)
        return logits, None if targets is None else lm_loss(logits, targets)

    def attention_inputs(self, T: int, cache, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None):
        """The rotary angles at the new tokens' positions ``[B | 1, 1, T, D/2]`` and the attention's keyword
        arguments (``cache``; ``mask`` where there is padding) for T new tokens after the cache's S."""
        past = 0 if cache is None else cache.get_seq_length()
        device = self.rope_cos.device
        mask = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != past + T:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, but there are {past} "
                                 f"cached and {T} new ones")
            keep = attention_mask.to(device=device, dtype=torch.bool)
            if position_ids is None:  # each token's position: how many tokens (not padding) precede it
                position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            if not bool(keep.all()):
                # a query sees the earlier tokens and itself (a padding query too: no row is all masked)
                causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)
                mask = causal & (keep[:, None, :] | ~causal.tril(past - 1))[:, None]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]
        position_ids = position_ids.to(device)
        if int(position_ids.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(position_ids.max())} is past max_seq_len {self.cfg.max_seq_len}")
        attention = {"cache": cache} if cache is not None else {}
        if mask is not None:
            attention["mask"] = mask
        return self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None], attention

    def enter_streams(self, idx: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, T]`` -> stream state ``[B, T, n, dim]`` (the embedding, copied to n streams)."""
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)
        if self.cfg.stream_dtype != "auto":
            x = x.to(getattr(torch, self.cfg.stream_dtype))
        return expand_streams(x, self.cfg.streams)

    def leave_streams(self, h: torch.Tensor) -> torch.Tensor:
        """Stream state ``[B, T, n, dim]`` -> logits ``[B, T, vocab]`` (merge, final norm, LM head)."""
        if self.head_merge is not None:
            h = self.head_merge(h)
        else:
            h = merge_streams(h, "mean" if self.cfg.merge == "mean" else "sum")
        return self.lm_head(self.norm(h))

    def recompute_interval(self) -> int:
        return self.cfg.recompute_every or optimal_interval(self.cfg.streams, 2 * self.cfg.n_layers)

    def _recompute_context(self):
        if self.cfg.recompute and self.cfg.streams > 1 and torch.is_grad_enabled():
            return stream_recompute(self.recompute_interval())
        return contextlib.nullcontext()

    def connections(self) -> list[nn.Module]:
        """The wrapped sublayers' connections, in depth order (attention, FFN, attention, ...)."""
        return [c for b in self.blocks for c in (b.attn, b.ffn)]

    def parameter_roles(self) -> dict[str, tuple[str, bool]]:
        """Every parameter's name -> (role, decayed), decided by the type of the module that owns it.

        Roles: ``embed``; ``attn`` and ``ffn`` (the sublayers); ``connection`` (each connection's own
        parameters and the head merge's: the maps that read, write and mix the streams); ``head``
        (final norm and LM head). Connections name their decayed parameters in ``DECAYED`` (the dynamic
        projections); elsewhere matrices are decayed and vectors (norm gains) are not.
        """
        roles: dict[str, tuple[str, bool]] = {}

        def visit(module: nn.Module, prefix: str, role: str) -> None:
            if isinstance(module, (StreamConnection, HyperHead)):
                for name, p in module.named_parameters(recurse=False):
                    roles[prefix + name] = ("connection", name in module.DECAYED)
            else:
                for name, p in module.named_parameters(recurse=False):
                    roles[prefix + name] = (role, p.dim() >= 2)
            for name, child in module.named_children():
                kind = {Attention: "attn", FeedForward: "ffn", nn.Embedding: "embed"}.get(type(child), role)
                visit(child, f"{prefix}{name}.", kind)

        visit(self, "", "head")
        # tied weights are listed once, under their first name (as named_parameters does)
        return {name: roles[name] for name, _ in self.named_parameters()}

    def param_groups(self, weight_decay: float, lr: float, connection_lr_scale: float = 1.0) -> list[dict]:
        """AdamW parameter groups: decayed or not, and the connection parameters at
        ``lr * connection_lr_scale``. The first group runs at the base lr; empty groups are dropped."""
        params = dict(self.named_parameters())
        groups: dict[tuple[bool, bool], list] = {(d, c): [] for d in (True, False) for c in (False, True)}
        for name, (role, decayed) in self.parameter_roles().items():
            groups[(decayed, role == "connection")].append(params[name])
        return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
                 "lr": lr * (connection_lr_scale if conn else 1.0)}
                for (decay, conn), ps in groups.items() if ps]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_params(self, exclude_embedding: bool = False, trained_only: bool = False) -> int:
        """Parameter entries; ``trained_only``: less those the output never reads (the connections' fixed
        mappings, e.g. the identity controls' res projection: ``unused_param_count``)."""
        n = sum(p.numel() for p in self.parameters())
        if trained_only:
            n -= sum(c.unused_param_count() for c in self.connections())
        return n - self.embed.weight.numel() if exclude_embedding else n

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 *, attention_mask: torch.Tensor | None = None, use_cache: bool = True, on_token=None):
        """Greedy when temperature == 0, else sampling (optionally top-k). idx ``[B, T]`` -> ``[B, T + new]``.

        ``attention_mask`` ``[B, T]``: 0 on left padding (each row then continues as it would alone).
        ``use_cache``: keep the keys and values (:class:`KVCache`) and run only the new token each step, while
        the sequence fits in ``max_seq_len``; past it, as without a cache, each step recomputes the last
        ``max_seq_len`` tokens. ``on_token(next [B, 1])`` is called with each new token as it comes.
        """
        window = self.cfg.max_seq_len
        use_cache = use_cache and isinstance(self, DecoderLM)  # ConvertedLM borrows this method; it has no cache
        cache = None
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] <= window:  # the cache holds every token but the last
                idx_in, kwargs, mask = idx[:, -1:], {"cache": cache}, attention_mask
            else:  # the first step, or past the window: the last max_seq_len tokens from scratch
                idx_in = idx[:, -window:]
                cache = KVCache() if use_cache and idx.shape[1] < window else None
                kwargs = {} if cache is None else {"cache": cache}
                mask = None if attention_mask is None else attention_mask[:, -window:]
            if mask is not None:
                kwargs["attention_mask"] = mask
            logits, _ = self(idx_in, **kwargs)
            logits = logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1)
            idx = torch.cat([idx, nxt], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(nxt.shape)], dim=1)
            if on_token is not None:
                on_token(nxt)
        return idx
