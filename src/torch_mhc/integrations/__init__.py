"""Hugging Face integrations (optional extra ``[hf]``: transformers >= 5.10, tokenizers).

- :mod:`~torch_mhc.integrations.hf_model`: ``DecoderLM`` as a transformers model (``TorchMhcConfig``,
  ``TorchMhcForCausalLM``); importing this package registers them with ``AutoConfig`` and
  ``AutoModelForCausalLM`` when transformers is installed.
- :mod:`~torch_mhc.integrations.export`: ``mhc export RUN_DIR OUT_DIR``.

Nothing else in torch_mhc imports this package (the CLI does, lazily).
"""

from __future__ import annotations

import importlib.util

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


try:
    require_transformers()
except UserError:
    pass  # the functions that need transformers say so when called
else:
    register_auto_classes()
