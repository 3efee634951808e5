"""``DecoderLM`` as a transformers model: ``TorchMhcConfig`` and ``TorchMhcForCausalLM``.

``from_pretrained``, ``save_pretrained``, ``generate()`` and the transformers ``Trainer`` work on it.
The weights are the native model's under ``model.`` (``model.blocks.0.attn.phi``, ...), so the
logits are the native model's. ``generate()`` keeps the keys and values in transformers' ``DynamicCache``
(``use_cache=False``: none) and honours ``attention_mask`` (left padding: each row as it would be alone);
once a sequence is longer than ``max_seq_len``, each step recomputes its last ``max_seq_len`` tokens, as
:meth:`DecoderLM.generate` does.

``init_weights()`` after a meta-device build and ``to_empty()`` initialises the model as its construction
does (:func:`reset_unloaded`); ``gradient_checkpointing_enable()`` recomputes each block in backward.

``mhc export`` copies this file into the exported directory as ``modeling_torch_mhc.py``, with its
``torch_mhc`` import pointed at a copy of the model code, so ``trust_remote_code=True`` loads it
where ``torch_mhc`` is not installed.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from torch_mhc.models.decoder import DecoderLM, ModelConfig, rope_tables


def _loaded(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "_is_hf_initialized", False)


@torch.no_grad()
def reset_unloaded(module: nn.Module, recurse: bool = False) -> None:
    """``module.reset_parameters()`` for the parameters and buffers that transformers has not marked as loaded
    (``_is_hf_initialized``); the loaded ones keep their values. ``recurse``: also the submodules' tensors (for
    a ``reset_parameters`` that sets them, as ``DecoderLM``'s does)."""
    tensors = itertools.chain(module.named_parameters(recurse=recurse), module.named_buffers(recurse=recurse))
    loaded = {name: t.detach().clone() for name, t in tensors if _loaded(t)}
    module.reset_parameters()
    for name, value in loaded.items():
        owner, _, attr = name.rpartition(".")
        getattr(module.get_submodule(owner), attr).copy_(value)


class TorchMhcConfig(PretrainedConfig):
    """``mhc``: the native ``ModelConfig`` as a dict; the transformers fields follow from it."""

    model_type = "torch_mhc"
    mhc: dict | None = None

    def __post_init__(self, **kwargs):
        self.mhc = ModelConfig(**(self.mhc or {})).to_dict()
        self.vocab_size = self.mhc["vocab_size"]
        self.hidden_size = self.mhc["dim"]
        self.num_hidden_layers = self.mhc["n_layers"]
        self.num_attention_heads = self.mhc["n_heads"]
        self.max_position_embeddings = self.mhc["max_seq_len"]
        self.tie_word_embeddings = self.mhc["tie_embeddings"]
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.mhc)


class TorchMhcForCausalLM(PreTrainedModel, GenerationMixin):
    """``forward(input_ids [B, T], attention_mask=None, cache=None, use_cache=None, labels=None) ->
    CausalLMOutputWithPast(loss, logits [B, T, vocab], cache)``."""

    config_class = TorchMhcConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True

    def __init__(self, config: TorchMhcConfig):
        super().__init__(config)
        self.model = DecoderLM(config.model_config())
        if not self.model.embed.weight.is_meta:  # DecoderLM.__init__ has initialised it: post_init must not redraw
            self.model._is_hf_initialized = True
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """``init_weights()`` (after a meta-device build and ``to_empty()``; ``from_pretrained``'s missing keys):
        ``DecoderLM.reset_parameters`` for what was not loaded, so one seed gives the model its eager construction
        gives. Everything saved was loaded: only the buffers that are not saved (rotary tables, MoE load counts).
        Its submodules are left to it."""
        if not isinstance(module, DecoderLM):
            return
        if all(_loaded(t) for t in module.state_dict(keep_vars=True).values()):
            cfg = module.cfg
            cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
            for moe in module.moe_layers():
                moe.load.zero_()
        else:
            reset_unloaded(module, recurse=True)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1):
        """What ``gradient_checkpointing_enable()`` calls: blocks 0, K, 2K, ... (K = ``every_n_layers``) run
        their forward under ``gradient_checkpointing_func`` (transformers' ``torch.utils.checkpoint``) while
        training with gradients, so autograd keeps only their input and recomputes them in backward. As
        ``mhc train``'s ``activation_checkpoint`` does (``distributed.parallelize``): the block keeps its
        parameter names (its class becomes a subclass of its own), and the fused kernels' read-ahead is not handed
        across a checkpointed block's boundary (``_CheckpointedBlock``)."""
        blocks = list(self.model.blocks)
        for block in blocks:
            if isinstance(block, _CheckpointedBlock):
                block.__class__ = block.__class__.__bases__[1]
                del block._gradient_checkpointing_func
            block.gradient_checkpointing = False
        if not enable:
            return
        for i, block in enumerate(blocks):
            if i % every_n_layers:
                continue
            cls = type(block)
            if cls not in _CHECKPOINTED_CLASSES:
                _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedBlock, cls), {})
            block.__class__ = _CHECKPOINTED_CLASSES[cls]
            block._gradient_checkpointing_func = gradient_checkpointing_func
            block.gradient_checkpointing = True

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, position_ids=None, cache=None,
                use_cache: bool | None = None, labels=None, **kwargs):
        """``attention_mask`` ``[B, S + T]`` (0 on padding) and ``cache`` (a transformers ``Cache`` holding S
        earlier tokens; input_ids then holds the T new ones) as transformers' models take them; ``use_cache``
        makes a ``DynamicCache`` when none is given. ``position_ids`` ``[B, T]``: default, each token's count of
        earlier tokens (padding not counted)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # older transformers' name (not tested here)
        if self.training and torch.is_grad_enabled() and any(
                getattr(b, "gradient_checkpointing", False) for b in self.model.blocks):
            cache, use_cache = None, False  # a checkpointed block's recompute would append to the cache again
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if attention_mask is not None and cache is None and position_ids is None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the training forward
        inference = {name: value for name, value in
                     (("cache", cache), ("attention_mask", attention_mask), ("position_ids", position_ids))
                     if value is not None}
        logits, _ = self.model(input_ids, **inference)
        loss = None
        if labels is not None:  # transformers convention: labels are input_ids, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      **kwargs):
        """transformers' preparation, except past ``max_seq_len`` tokens: then the last ``max_seq_len`` tokens
        are run from an emptied cache, at positions counted from the window's start (as ``DecoderLM.generate``)."""
        window = self.config.max_position_embeddings
        if input_ids.shape[1] > window:
            if cache is not None:
                cache.reset()
            input_ids, next_sequence_length = input_ids[:, -window:], None
            attention_mask = None if attention_mask is None else attention_mask[:, -window:]
            kwargs.pop("position_ids", None)
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                     cache=cache, attention_mask=attention_mask, **kwargs)


class _CheckpointedBlock:
    """Mixed into a ``Block``'s class by ``gradient_checkpointing_enable()``: while training with gradients, its
    forward runs under ``_gradient_checkpointing_func``; otherwise (eval, sampling) it is plain."""

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, read_ahead=None, reader=None,
                **attention):
        """-> (streams, read-ahead or None); checkpointed, the block takes no read-ahead and computes none (the
        recompute reads its input anew)."""
        forward = super().forward
        if self._checkpointing():
            # the tensors that may need gradients positionally (reentrant checkpoints pass no keyword arguments)
            return self._gradient_checkpointing_func(
                lambda h, cos, sin: forward(h, cos, sin, **attention)[0], h, cos, sin), None
        return forward(h, cos, sin, read_ahead=read_ahead, reader=reader, **attention)

    def _checkpointing(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def first_reader(self):
        return None if self._checkpointing() else super().first_reader()


_CHECKPOINTED_CLASSES: dict[type, type] = {}

# the output's cache field: ``cache`` since transformers renamed ``past_key_values``
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
