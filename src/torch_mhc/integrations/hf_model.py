"""``DecoderLM`` as a transformers model: ``TorchMhcConfig`` and ``TorchMhcForCausalLM``.

``from_pretrained``, ``save_pretrained``, ``generate()`` and the transformers ``Trainer`` work on it.
The weights are the native model's under ``model.`` (``model.blocks.0.attn.phi``, ...), so the
logits are the native model's. Generation recomputes the window each step (``DecoderLM`` has no
KV cache), cropped to ``max_seq_len`` as :meth:`DecoderLM.generate` does.

``mhc export`` copies this file into the exported directory as ``modeling_torch_mhc.py``, with its
``torch_mhc`` import pointed at a copy of the model code, so ``trust_remote_code=True`` loads it
where ``torch_mhc`` is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from torch_mhc.models.decoder import DecoderLM, ModelConfig, rope_tables


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
    """``forward(input_ids [B, T], labels=None) -> CausalLMOutputWithPast(loss, logits [B, T, vocab])``."""

    config_class = TorchMhcConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = False

    def __init__(self, config: TorchMhcConfig):
        super().__init__(config)
        self.model = DecoderLM(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """The native initialisation (``DecoderLM.__init__`` has run); only the rotary tables, which
        are not saved, are recomputed when the model was built on the meta device."""
        if isinstance(module, DecoderLM):
            cfg = module.cfg
            cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("TorchMhcForCausalLM has no padding support: pass unpadded input_ids "
                             "(an attention_mask of all ones)")
        logits, _ = self.model(input_ids)
        loss = None
        if labels is not None:  # transformers convention: labels are input_ids, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids[:, -self.config.max_position_embeddings :]}
