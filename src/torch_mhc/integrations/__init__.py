"""Hugging Face integrations (optional extra ``[hf]``: transformers >= 5.10, tokenizers).

- :mod:`~torch_mhc.integrations.hf_model`: ``DecoderLM`` as a transformers model (``TorchMhcConfig``,
  ``TorchMhcForCausalLM``); importing this package registers them with ``AutoConfig`` and
  ``AutoModelForCausalLM`` when transformers is installed.
- :mod:`~torch_mhc.integrations.export`: ``mhc export RUN_DIR OUT_DIR``.
- :mod:`~torch_mhc.integrations.convert`: Llama/Mistral/Qwen models converted to mHC; importing this
  package registers their ``mhc_<type>`` configs and models with the Auto classes too.
- :mod:`~torch_mhc.integrations.deepseek_v4`: ``apply_mhc_kernels`` on transformers' DeepSeek-V4.

Nothing else in torch_mhc imports this package (the CLI does, lazily).
"""

from __future__ import annotations

import importlib.util
import types

from torch import nn

from torch_mhc.train.config import UserError
from torch_mhc.train.data import HF_HINT

MIN_TRANSFORMERS = (5, 10)


def require_transformers() -> None:
    """Raise UserError unless transformers >= 5.10 is installed."""
    if importlib.util.find_spec("transformers") is None:
        raise UserError(f"this needs the 'transformers' package (>= 5.10); {HF_HINT}.")
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRANSFORMERS:
        raise UserError(f"this needs transformers >= 5.10, found {transformers.__version__}; {HF_HINT}.")


def register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` load ``model_type: torch_mhc`` without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from torch_mhc.integrations.hf_model import TorchMhcConfig, TorchMhcForCausalLM

    if TorchMhcConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(TorchMhcConfig.model_type, TorchMhcConfig)
        AutoModelForCausalLM.register(TorchMhcConfig, TorchMhcForCausalLM)
    from torch_mhc.integrations.convert import register_auto_classes as register_converted

    register_converted()


def _init_weights(self, module: nn.Module) -> None:
    """The model's own ``_init_weights``, except for torch_mhc's modules: their ``reset_parameters``
    (which initialise them as their construction does), for what transformers has not loaded."""
    from torch_mhc.integrations.hf_model import reset_unloaded
    from torch_mhc.nn import HyperHead, StreamConnection

    if isinstance(module, (StreamConnection, HyperHead)):
        reset_unloaded(module)
    else:
        type(self)._init_weights(self, module)


def hook_init_weights(model: nn.Module, layer_class_names) -> None:
    """transformers' ``init_weights()`` dispatches on its own classes: route it, for ``model`` and each of
    its transformers sub-models, to :func:`_init_weights`; add ``layer_class_names`` (the swapped decoder
    layers) to their ``_no_split_modules`` (device maps keep such a layer whole)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m._init_weights = types.MethodType(_init_weights, m)
            m._no_split_modules = set(m._no_split_modules or ()) | set(layer_class_names)


try:
    require_transformers()
except UserError:
    pass  # the functions that need transformers say so when called
else:
    register_auto_classes()
