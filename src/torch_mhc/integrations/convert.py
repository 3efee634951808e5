"""Turning a pretrained Llama-, Mistral-, Qwen2- or Qwen3-style transformers model into an mHC model.

``convert_to_mhc(model, n=4)`` works in place: the residual stream becomes ``n`` streams (copied
after the embedding, on entry to the first decoder layer), every attention and MLP sublayer gets
its own :class:`~torch_mhc.nn.ManifoldHyperConnection` (``layers.i.attn_mhc``, ``layers.i.mlp_mhc``,
fp32 parameters; fp64 in a float64 model), and the streams are merged by their mean on exit from the last decoder layer,
before the final norm. The initialisation makes the converted model compute what the original
computed (the logits agree at step 0 up to the Sinkhorn eps, whose row sums ``s / (s + eps)``
shrink the residual by about ``eps`` per sublayer):

- ``H_post = 2 sigmoid(0) = 1`` for every stream and ``H_res`` doubly stochastic, so copied
  streams stay copies of the original residual stream and their mean is that stream;
- ``H_pre`` sums to 1 (``1/(2n)`` on each stream, the rest on the sublayer's "home" stream
  ``index % n``, which differs between sublayers and so separates the streams' gradients), and
  the dynamic ``phi`` columns of pre and post are zero, so the sublayer input is the residual stream.

The converted model is still the transformers model, as a subclass: ``LlamaForCausalLM`` becomes
``MhcLlamaForCausalLM`` (its config ``MhcLlamaConfig``, ``model_type: mhc_llama``) and each decoder
layer ``MhcLlamaDecoderLayer``, whose ``forward`` runs the connections; being subclasses, every
transformers feature stays: ``generate`` with its KV cache, gradient checkpointing (transformers wraps
the subclass's ``forward``), ``init_weights()`` (the connections initialise as construction does,
through their ``reset_parameters``), ``save_pretrained``/``from_pretrained``. The connections' ``phi``,
``bias`` and ``alpha`` are ordinary parameters that any training loop updates (the tests use a plain
optimizer step; the transformers ``Trainer``, which needs ``accelerate``, is not exercised here).

A converted directory declares what it is: its ``config.json`` says ``model_type: mhc_llama`` (and
``architectures: [MhcLlamaForCausalLM]``) and records the conversion (``mhc_conversion``). Importing
``torch_mhc.integrations`` registers these types with ``AutoConfig``/``AutoModelForCausalLM``, so a plain
``AutoModelForCausalLM.from_pretrained(dir)`` then builds the mHC model; without torch_mhc, transformers
refuses the unknown ``model_type`` instead of loading a Llama that silently drops every connection. No
code is shipped in the directory and nothing needs ``trust_remote_code``. ``save_converted``/
``load_converted`` write and read such directories (``load_converted`` also reads directories written
before, which say ``llama`` plus ``mhc_conversion``); ``mhc convert HF_DIR OUT_DIR`` does both, and
``mhc train --init-from DIR`` continues pretraining through :class:`ConvertedLM`.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torch_mhc.models.decoder import DecoderLM, ModelConfig
from torch_mhc.nn import ManifoldHyperConnection, expand_streams, merge_streams
from torch_mhc.serialization import usual_permissions
from torch_mhc.train.config import UserError
from torch_mhc.train.trainer import register_init_from

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
CONVERSION_KEY = "mhc_conversion"
MHC_PREFIX = "mhc_"  # model_type of a converted model: mhc_llama, ...
CONNECTION_SITES = ("attn_mhc", "mlp_mhc")


@torch.no_grad()
def residual_init_(conn: ManifoldHyperConnection, home: int) -> ManifoldHyperConnection:
    """Make ``conn`` act as the residual ``x + F(x)`` on copied streams (see the module docstring)."""
    n = conn.n
    phi, bias, _ = conn.projection()
    share = 1.0 / (2 * n)
    bias[:n] = math.log(share / (1 - share))
    home_share = 1.0 - (n - 1) * share
    bias[home % n] = math.log(home_share / (1 - home_share))
    bias[n : 2 * n] = 0.0
    bias[2 * n :] = (6.0 * torch.eye(n) - 3.0).flatten()
    phi[:, : 2 * n] = 0.0
    return conn


class ConvertedConnection(ManifoldHyperConnection):
    """A ManifoldHyperConnection whose ``reset_parameters`` (construction, ``init_weights()``) ends
    with :func:`residual_init_` on its home stream ``layer_index % n``."""

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        residual_init_(self, self.layer_index)


def _mhc_layer_forward(self, hidden_states, *args, **kwargs):
    """A Llama-style decoder layer on streams ``[B, S, n, D]`` (``[B, S, D]`` in for the first layer,
    out of the last)."""
    if self.mhc_expand:
        hidden_states = expand_streams(hidden_states, self.attn_mhc.n)
    x, state = self.attn_mhc.pre(hidden_states)
    attn_output, _ = self.self_attn(self.input_layernorm(x), *args, **kwargs)
    hidden_states = self.attn_mhc.post(state, attn_output)
    x, state = self.mlp_mhc.pre(hidden_states)
    hidden_states = self.mlp_mhc.post(state, self.mlp(self.post_attention_layernorm(x)))
    return merge_streams(hidden_states, "mean") if self.mhc_merge else hidden_states


def _subclass(base: type, name: str, attrs: dict) -> type:
    return type(name, (base,), {"__module__": __name__, "__qualname__": name, **attrs})


@functools.cache
def mhc_layer_class(layer_class: type) -> type:
    """``Mhc<Layer>``: the decoder layer class with :func:`_mhc_layer_forward` (a subclass, so
    transformers' gradient checkpointing wraps its forward as it wraps the original's)."""
    return _subclass(layer_class, f"Mhc{layer_class.__name__}", {
        "forward": _mhc_layer_forward, "__doc__": f"{layer_class.__name__} on mHC streams (convert_to_mhc)."})


@functools.cache
def mhc_config_class(config_class: type) -> type:
    """``Mhc<Config>``: the config class with ``model_type = mhc_<type>``, nothing else changed."""
    return _subclass(config_class, f"Mhc{config_class.__name__}", {
        "model_type": MHC_PREFIX + config_class.model_type,
        "__doc__": f"{config_class.__name__} of a model converted to mHC (its mhc_conversion records how)."})


@functools.cache
def mhc_model_class(model_class: type) -> type:
    """``Mhc<Model>``: the transformers model class whose ``__init__`` converts the layers as the
    config's ``mhc_conversion`` says (for ``from_pretrained``), connections kept in fp32."""

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        conversion = getattr(config, CONVERSION_KEY, None)
        if not conversion:
            raise ValueError(f"{type(self).__name__} needs a config with {CONVERSION_KEY} (use convert_to_mhc)")
        _convert_layers(self, **conversion)

    fp32 = list(getattr(model_class, "_keep_in_fp32_modules_strict", None) or []) + list(CONNECTION_SITES)
    return _subclass(model_class, f"Mhc{model_class.__name__}", {
        "__init__": __init__, "config_class": mhc_config_class(model_class.config_class),
        "_keep_in_fp32_modules_strict": fp32,
        "__doc__": f"{model_class.__name__} converted to mHC (convert_to_mhc; from_pretrained of a converted dir)."})


def base_model_type(config) -> str | None:
    """``llama`` for a ``llama`` or ``mhc_llama`` config; None for configs of other types."""
    model_type = getattr(config, "model_type", None) or ""
    model_type = model_type.removeprefix(MHC_PREFIX)
    return model_type if model_type in SUPPORTED else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported transformers causal LM (or its base model)."""
    if base_model_type(getattr(model, "config", None)) is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"convert_to_mhc supports transformers models of type {', '.join(SUPPORTED)}; "
                         f"got {model_type or type(model).__name__}")
    base = model.model if hasattr(model, "model") else model
    return base.layers[: model.config.num_hidden_layers]


def _convert_layers(model: nn.Module, n: int, sinkhorn_iters: int, eps: float, alpha_init: float) -> None:
    """Give every decoder layer its two connections and the mHC layer class (in place)."""
    from torch_mhc.integrations import hook_init_weights

    layers = decoder_layers(model)
    first = next(model.parameters())
    dim, device = model.config.hidden_size, first.device
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    for i, layer in enumerate(layers):
        for site, index in zip(CONNECTION_SITES, (2 * i, 2 * i + 1)):
            with torch.device("cpu"):  # built and initialised on the CPU, also under from_pretrained's meta device
                conn = ConvertedConnection(dim, n, layer_index=index, sinkhorn_iters=sinkhorn_iters, eps=eps,
                                           alpha_init=alpha_init)
            setattr(layer, site, residual_init_(conn.to(device=device, dtype=dtype), index))  # again in dtype
        layer.mhc_expand, layer.mhc_merge = i == 0, i == len(layers) - 1
        layer.__class__ = mhc_layer_class(type(layer))
    hook_init_weights(model, {type(layer).__name__ for layer in layers})


def convert_to_mhc(model: nn.Module, n: int = 4, *, sinkhorn_iters: int = 20, eps: float = 1e-6,
                   alpha_init: float = 0.01) -> nn.Module:
    """Convert a Llama/Mistral/Qwen2/Qwen3 transformers model to mHC in place; returns it (now an
    instance of ``Mhc<its class>``, its config an ``Mhc<its config class>``).

    ``n`` >= 2 streams; ``sinkhorn_iters``, ``eps``, ``alpha_init`` as in ManifoldHyperConnection.
    """
    layers = decoder_layers(model)
    if getattr(model.config, CONVERSION_KEY, None) or any(hasattr(layer, "attn_mhc") for layer in layers):
        raise ValueError("this model is already converted to mHC")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"convert_to_mhc needs n >= 2 streams, got {n!r}")
    conversion = {"n": n, "sinkhorn_iters": sinkhorn_iters, "eps": eps, "alpha_init": alpha_init}
    _convert_layers(model, **conversion)
    setattr(model.config, CONVERSION_KEY, conversion)
    if not type(model.config).model_type.startswith(MHC_PREFIX):
        model.config.__class__ = mhc_config_class(type(model.config))
    vars(model.config).pop("model_type", None)  # a config read from a file may hold its own: the class's counts
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and type(model).__module__ != __name__:
        model.__class__ = mhc_model_class(type(model))
        try:  # transformers keys what a model records (output_hidden_states, ...) on its class
            from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

            _CAN_RECORD_REGISTRY[model] = model._can_record_outputs
        except ImportError:
            pass
    return model


def register_auto_classes() -> None:
    """``AutoConfig``/``AutoModelForCausalLM`` build ``mhc_llama`` (``mhc_mistral``, ...) directories as
    the converted model, from this code (no remote code)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type in SUPPORTED:
        causal_lm = getattr(transformers, CONFIG_MAPPING[model_type].__name__.removesuffix("Config") + "ForCausalLM")
        model_class = mhc_model_class(causal_lm)
        if model_class.config_class.model_type not in CONFIG_MAPPING:
            AutoConfig.register(model_class.config_class.model_type, model_class.config_class)
            AutoModelForCausalLM.register(model_class.config_class, model_class)


def mhc_connections(model: nn.Module) -> list[ManifoldHyperConnection]:
    """The converted model's connections in depth order (attention, MLP, attention, ...)."""
    return [c for layer in decoder_layers(model) for c in (layer.attn_mhc, layer.mlp_mhc)]


def save_converted(model: nn.Module, out_dir: str | Path) -> Path:
    """``save_pretrained`` (the config records the conversion; the connections are in the weights), the
    files with the usual permissions (safetensors writes 0600)."""
    model.save_pretrained(out_dir)
    usual_permissions(out_dir)
    return Path(out_dir)


def check_hf_dir(path: str | Path, key: str) -> dict:
    """The parsed ``config.json`` of the transformers directory ``path``; UserError naming ``key`` and
    what is wrong: no directory or config, invalid JSON, a config asking for remote code, an unknown
    ``model_type``. Nothing in the directory is imported or run."""
    from transformers import CONFIG_MAPPING

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{key}={path}: no transformers model there (no config.json). "
                        "Pass a directory written by 'mhc convert' or save_pretrained.")
    try:
        values = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{key}={path}: {config} is not valid JSON (truncated or not a config): {e}.") from None
    if not isinstance(values, dict):
        raise UserError(f"{key}={path}: {config} holds no JSON object.")
    if "auto_map" in values:
        raise UserError(f"{key}={path}: its config.json asks to run code shipped in the directory (auto_map "
                        f"{values['auto_map']}); torch-mhc never runs a model directory's code. Load it in "
                        "Python with trust_remote_code=True yourself if you trust it.")
    if values.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"{key}={path}: model_type {values.get('model_type')!r} in its config.json is not one "
                        "this version of transformers knows.")
    return values


def _from_pretrained(loader, path: Path, key: str, **kwargs):
    """``loader.from_pretrained`` from local files only and without remote code; UserError naming
    ``key`` and ``path`` when the directory's files cannot be read (truncated weights, missing files)."""
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}={path}: cannot load the model ({type(e).__name__}: {first}). Check that its "
                        "files are complete (a truncated model.safetensors, a missing shard).") from None


def _connection_weights(path: Path, wanted, load: bool = True) -> dict:
    """The tensors (None with ``load=False``) of ``wanted``'s keys in ``path``'s safetensors files
    (tensors only, no code); UserError when some are missing."""
    from safetensors import safe_open

    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) if load else None for k in f.keys() if k in wanted})
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise UserError(f"{path} records an mHC conversion but its weights lack {len(missing)} connection "
                        f"parameters (first: {missing[0]}).")
    return found


def load_converted(path: str | Path, n: int = 4, key: str = "path", **kwargs) -> nn.Module:
    """A causal LM from a transformers directory: the converted model when it was saved converted
    (``model_type: mhc_llama``, or, as written before, ``llama`` with ``mhc_conversion``), converted
    fresh with ``n`` streams when it was not."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    path = Path(path)
    values = check_hf_dir(path, key)
    if values["model_type"].startswith(MHC_PREFIX):  # registered with the Auto classes: loads the connections
        model = _from_pretrained(AutoModelForCausalLM, path, key, **kwargs)
        _connection_weights(path, {k for k in model.state_dict() if "_mhc." in k}, load=False)  # all were there
        return model
    conversion = getattr(_from_pretrained(AutoConfig, path, key), CONVERSION_KEY, None)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the base class reports the connections' weights as unexpected: loaded below
    try:
        model = _from_pretrained(AutoModelForCausalLM, path, key, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    if not conversion:
        return convert_to_mhc(model, n)
    delattr(model.config, CONVERSION_KEY)
    convert_to_mhc(model, **conversion)
    wanted = {k: v for k, v in model.state_dict().items() if "_mhc." in k}
    with torch.no_grad():
        for k, v in _connection_weights(path, wanted).items():
            wanted[k].copy_(v)
    return model


class ConvertedLM(nn.Module):
    """A converted transformers causal LM behind ``DecoderLM``'s interface, for ``mhc train --init-from``:
    ``forward(idx [B, T], targets=None) -> (logits [B, T, vocab], loss | None)``, ``connections()``,
    ``cfg`` (a ModelConfig describing it), ``generate``."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        c, conv = hf_model.config, getattr(hf_model.config, CONVERSION_KEY)
        self.cfg = ModelConfig(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                               n_heads=c.num_attention_heads, max_seq_len=c.max_position_embeddings,
                               norm_eps=c.rms_norm_eps, tie_embeddings=bool(c.tie_word_embeddings), connection="mhc",
                               n_streams=conv["n"], merge="mean", sinkhorn_iters=conv["sinkhorn_iters"],
                               mhc_eps=conv["eps"], alpha_init=conv["alpha_init"])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))
        return logits, loss

    def connections(self) -> list[ManifoldHyperConnection]:
        return mhc_connections(self.hf)

    def parameter_roles(self) -> dict[str, tuple[str, bool]]:
        """Every parameter's name -> (role, decayed), with DecoderLM's roles: ``connection`` (the
        connections' own, ``phi`` decayed), ``embed``, ``attn``, ``ffn``, ``head`` (the rest);
        elsewhere matrices are decayed and vectors are not."""
        roles = {}
        for module_name, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}"
                if isinstance(module, ManifoldHyperConnection):
                    roles[full] = ("connection", name in module.DECAYED)
                    continue
                role = ("embed" if p is self.hf.get_input_embeddings().weight else "attn" if ".self_attn." in full
                        else "ffn" if ".mlp." in full else "head")
                roles[full] = (role, p.dim() >= 2)
        return {name: roles[name] for name, _ in self.named_parameters()}

    param_groups = DecoderLM.param_groups

    def moe_layers(self) -> list:
        return []

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.hf.get_input_embeddings().weight.numel() if exclude_embedding else n

    generate = DecoderLM.generate


def load_for_training(path: str | Path, n: int = 4) -> ConvertedLM:
    """``mhc train --init-from``: a converted (or, with ``n`` streams, freshly converted) model from
    a transformers directory; UserError when it cannot be read."""
    from torch_mhc.integrations import require_transformers

    require_transformers()
    return ConvertedLM(load_converted(path, n, key="init_from"))


def convert_dir(hf_dir: str | Path, out_dir: str | Path, n: int = 4, log=print) -> Path:
    """``mhc convert``: load a Llama/Mistral/Qwen2/Qwen3 directory, convert it, save it (with its tokenizer)."""
    from torch_mhc.integrations import require_transformers
    from torch_mhc.integrations.export import check_new_dir

    require_transformers()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    values = check_hf_dir(hf_dir, "hf_dir")
    check_new_dir(out_dir)
    if n < 2:
        raise UserError(f"--streams must be >= 2 (got {n}).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if values.get(CONVERSION_KEY) or values["model_type"].startswith(MHC_PREFIX):
        raise UserError(f"{hf_dir} is already converted to mHC.")
    if values["model_type"] not in SUPPORTED:
        raise UserError(f"{hf_dir} holds a {values['model_type']!r} model; mhc convert supports "
                        f"{', '.join(SUPPORTED)}.")
    model = _from_pretrained(AutoModelForCausalLM, hf_dir, "hf_dir")
    save_converted(convert_to_mhc(model, n), out_dir)
    note = "no tokenizer found"
    try:
        AutoTokenizer.from_pretrained(hf_dir, local_files_only=True, trust_remote_code=False).save_pretrained(out_dir)
        note = "tokenizer copied"
    except (OSError, ValueError):
        pass
    log(f"converted {hf_dir} ({values['model_type']}, {model.config.num_hidden_layers} layers) to mHC with n={n} "
        f"streams in {out_dir} (model_type {model.config.model_type}: load it with torch_mhc imported); {note}")
    return out_dir


register_init_from(load_for_training)  # mhc train --init-from, and eval/sample/export of such runs
