"""``mhc export RUN_DIR OUT_DIR``: a run's latest checkpoint as a transformers model directory.

OUT_DIR holds ``config.json`` (with ``auto_map``), ``model.safetensors``, ``generation_config.json``,
a model card ``README.md`` (what the model is, how it was trained, how to load it), the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json`` with the special tokens; byte, BPE and PATH tokenizers)
and the model code: ``modeling_torch_mhc.py`` (this package's ``hf_model.py``) and flat copies of
the model's modules (``mhc_decoder.py``, ``mhc_connections.py``, ...) with their ``torch_mhc``
imports made relative. ``trust_remote_code=True`` loads that code where ``torch_mhc`` is not
installed (PyTorch reference path; the fused kernels stay in ``torch_mhc``); where it is,
``import torch_mhc.integrations`` registers the classes and no remote code is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from torch_mhc.errors import write_error
from torch_mhc.serialization import usual_permissions
from torch_mhc.train.config import UserError

PACKAGE = Path(__file__).resolve().parents[1]
# the model's modules and their flat names in an exported directory
VENDORED = {
    "torch_mhc.models.decoder": "mhc_decoder",
    "torch_mhc.models.moe": "mhc_moe",
    "torch_mhc.nn": "mhc_nn",
    "torch_mhc.nn.connections": "mhc_connections",
    "torch_mhc.nn.functional": "mhc_functional",
    "torch_mhc.nn.maps": "mhc_maps",
    "torch_mhc.nn.recompute": "mhc_recompute",
    "torch_mhc.nn.sinkhorn": "mhc_sinkhorn",
    "torch_mhc.nn.streams": "mhc_streams",
    "torch_mhc.numerics": "mhc_numerics",
}
OPS_STANDIN = '''"""Stand-in for ``torch_mhc.ops`` in exported model code: always the PyTorch reference path
(the fused Triton kernels ship with the torch_mhc package)."""


class ops:
    @staticmethod
    def should_fuse(x, width=None) -> bool:
        return False
'''
IMPORT_RE = re.compile(r"^(\s*)from\s+(torch_mhc[\w.]*)\s+import\s+(.*)$", re.MULTILINE)
AUTO_MAP = {"AutoConfig": "modeling_torch_mhc.TorchMhcConfig",
            "AutoModelForCausalLM": "modeling_torch_mhc.TorchMhcForCausalLM"}


def _module_file(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    return PACKAGE / rel / "__init__.py" if (PACKAGE / rel).is_dir() else PACKAGE / rel.with_suffix(".py")


def make_relative(source: str, what: str) -> str:
    """Point every ``from torch_mhc... import`` in ``source`` at the flat copies (``from .mhc_x import``);
    raises RuntimeError for an import of a module that is not copied."""

    def repl(m: re.Match) -> str:
        indent, module, names = m.groups()
        if module == "torch_mhc" and names.strip() == "ops":
            return f"{indent}from .mhc_ops import ops"
        if module == "torch_mhc.nn" and names.strip() == "custom_ops":  # torch.compile's ops stay in torch_mhc (the
            return f"{indent}custom_ops = None"  # stand-in ops never fuse, so nothing reaches them)
        if module not in VENDORED:
            raise RuntimeError(f"{what} imports {module}, which export does not copy; add it to VENDORED")
        first = names.strip().strip("(").split(",")[0].split(" as ")[0].strip()
        if f"{module}.{first}" in VENDORED:  # a submodule: "from torch_mhc.nn import functional as Fm"
            parts = [p.strip() for p in names.split(",")]
            if len(parts) != 1:
                raise RuntimeError(f"{what}: import submodules one per line ({m.group(0).strip()})")
            name, _, alias = parts[0].partition(" as ")
            return f"{indent}from . import {VENDORED[f'{module}.{name.strip()}']} as {(alias or name).strip()}"
        return f"{indent}from .{VENDORED[module]} import {names}"

    out = IMPORT_RE.sub(repl, source)
    if re.search(r"^\s*import\s+torch_mhc", out, re.MULTILINE):
        raise RuntimeError(f"{what} has an 'import torch_mhc...' statement that export cannot rewrite")
    return out


def write_model_code(out_dir: Path) -> list[Path]:
    """The self-contained model code in ``out_dir``."""
    written = []
    for module, flat in VENDORED.items():
        if not _module_file(module).is_file():  # not in this checkout: nothing here imports it
            continue
        path = out_dir / f"{flat}.py"
        path.write_text(make_relative(_module_file(module).read_text(), module))
        written.append(path)
    (out_dir / "mhc_ops.py").write_text(OPS_STANDIN)
    wrapper = (Path(__file__).parent / "hf_model.py").read_text()
    (out_dir / "modeling_torch_mhc.py").write_text(make_relative(wrapper, "hf_model.py"))
    return [*written, out_dir / "mhc_ops.py", out_dir / "modeling_torch_mhc.py"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_hf_tokenizer():
    """A ``tokenizers.Tokenizer`` identical to :class:`ByteTokenizer`: UTF-8 byte b is token id b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def run_tokenizer_for_export(cfg, run_dir: Path, state: dict):
    """The run's own tokenizer (``data.run_tokenizer``: stored in the run, checked against its checkpoint's
    SHA-256), or None for gpt2 (not exported). Called before anything is written."""
    from torch_mhc.train.data import run_tokenizer

    return None if cfg.tokenizer == "gpt2" else run_tokenizer(run_dir, cfg, state)


ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
# byte and bpe:VOCAB runs train on text without special tokens, so their exports name two byte tokens that
# UTF-8 text never contains (0xFF, 0xFE: the model never saw them) the end of text and the padding token
END_OF_TEXT, PAD = "<|endoftext|>", "<|pad|>"
UNUSED_BYTES = {0xFF: END_OF_TEXT, 0xFE: PAD}


def _with_end_tokens(backend):
    """``backend`` (byte-level: byte or bpe:VOCAB) with the tokens of bytes 0xFF and 0xFE renamed
    ``<|endoftext|>`` and ``<|pad|>`` and made special; ids and the encoding of any text (which never holds
    those bytes) unchanged. ``(tokenizer, roles)``; ``roles`` is empty when a merge uses those bytes."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    vocab, chars = data["model"]["vocab"], bytes_to_unicode()
    used = {c for merge in data["model"].get("merges") or []
            for part in (merge.split(" ") if isinstance(merge, str) else merge) for c in part}
    if any(chars[b] not in vocab or chars[b] in used for b in UNUSED_BYTES):
        return backend, {}
    for b, name in UNUSED_BYTES.items():
        vocab[name] = vocab.pop(chars[b])
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(list(UNUSED_BYTES.values()))
    return tok, {"eos_token": END_OF_TEXT, "pad_token": PAD}


def _source_roles(source: Path, backend) -> dict:
    """The special-token roles that the ``tokenizer_config.json`` (or ``special_tokens_map.json``) beside the
    tokenizer ``source`` (a file or directory) gives, if that directory's ``tokenizer.json`` is ``backend``."""
    from tokenizers import Tokenizer

    folder = source if source.is_dir() else source.parent
    try:
        if Tokenizer.from_file(str(folder / "tokenizer.json")).to_str() != backend.to_str():
            return {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                values = json.loads((folder / name).read_text())
                roles = {r: v.get("content") if isinstance(v, dict) else v for r in ROLES if (v := values.get(r))}
                if roles:
                    return {r: v for r, v in roles.items() if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - gone, unreadable or another tokenizer: no roles from there
        pass
    return {}


def tokenizer_roles(cfg, tok, model_config=None) -> tuple[object | None, dict[str, str]]:
    """The ``tokenizers.Tokenizer`` to export for the run's tokenizer ``tok`` and its special tokens
    (``{"eos_token": "</s>", ...}``): for a tokenizer from a directory (a PATH tokenizer, an ``init_from``
    model's), the roles its ``tokenizer_config.json`` gives if it still holds the run's tokenizer, else the
    ids ``model_config`` (a converted model's transformers config) names; for byte and ``bpe:VOCAB``,
    ``<|endoftext|>`` and ``<|pad|>`` on bytes 0xFF and 0xFE (:func:`_with_end_tokens`). ``(None, {})``
    for gpt2 (not exported)."""
    from torch_mhc.train.data import HFTokenizer

    if tok is None:
        return None, {}
    if not isinstance(tok, HFTokenizer):
        return _with_end_tokens(byte_hf_tokenizer())
    backend = tok._tok
    if cfg.tokenizer.startswith("bpe:"):
        return _with_end_tokens(backend)
    roles = {}
    for source in (cfg.tokenizer, cfg.init_from):
        if source and not roles:
            roles = _source_roles(Path(source), backend)
    if not roles and model_config is not None:
        for role in ROLES:
            ids = getattr(model_config, f"{role}_id", None)
            first = ids[0] if isinstance(ids, (list, tuple)) and ids else ids
            if isinstance(first, int) and (name := backend.id_to_token(first)) is not None:
                roles[role] = name
    return backend, roles


def export_tokenizer(cfg, backend, roles: dict, out_dir: Path) -> None:
    """Save ``backend`` with its special-token ``roles`` (:func:`tokenizer_roles`) as transformers files."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=cfg.model.max_seq_len,
                            **roles).save_pretrained(out_dir)


def _token_ids(backend, roles: dict) -> dict[str, int]:
    """``{"eos_token_id": 255, ...}`` of ``roles``."""
    return {f"{role}_id": backend.token_to_id(name) for role, name in roles.items()
            if backend.token_to_id(name) is not None}


def _tokenizer_note(tok, roles: dict) -> str:
    if tok is None:
        return "tokenizer: not exported (gpt2 comes from tiktoken; load transformers' GPT-2 tokenizer instead)"
    special = ", ".join(f"{r.removesuffix('_token')} {v!r}" for r, v in roles.items()) or "no special tokens"
    return f"tokenizer: {tok.name} ({tok.vocab_size} tokens; {special})"


def check_new_dir(out_dir: Path) -> None:
    """UserError unless ``out_dir`` is new or an empty directory (nothing is ever overwritten)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output directory {out_dir} exists and is not empty; nothing was overwritten. Choose another.")


@contextmanager
def new_dir_via_temp(out_dir: Path):
    """Yield a temporary directory beside ``out_dir`` to write into; when the block ends without error it is
    renamed to ``out_dir`` (which must still be new or empty), otherwise removed. So ``out_dir`` is never
    half-written, and a full disk or a read-only file system is a UserError naming ``out_dir``."""
    out_dir = Path(os.path.abspath(out_dir))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        check_new_dir(out_dir)
        os.rename(tmp, out_dir)  # replaces an empty directory (POSIX rename)
    except BaseException as e:
        error = write_error(e, out_dir, "run the command again", f"nothing was left in {out_dir}")
        shutil.rmtree(tmp, ignore_errors=True)  # after write_error: a full disk is seen full
        if error is not None:
            raise error from None
        raise


def _training_summary(run_dir: Path, state: dict) -> dict:
    """Steps, tokens and the last losses of ``run_dir``'s ``metrics.jsonl`` up to the checkpoint's step
    (what a model card reports); values the log does not hold are left out."""
    summary = {"steps": state["step"]}
    try:
        lines = (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return summary
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > state["step"]:
            continue
        for key in ("tokens", "loss", "bpb", "val_loss", "val_bpb"):
            if isinstance(record.get(key), (int, float)):
                summary[key] = record[key]
                summary[f"{key}_step"] = record["step"]
    return summary


def model_card(cfg, run_dir: Path, state: dict, roles: dict, tokenizer_name: str | None) -> str:
    """``README.md`` of an exported directory: what the model is, its config, how it was trained (from the
    run's config and ``metrics.jsonl``) and how to load it."""
    m, t = cfg.model, _training_summary(run_dir, state)
    kind = {"residual": "a plain residual", "hc": "a hyper-connection (HC)",
            "mhc": "a manifold-constrained hyper-connection (mHC)"}.get(m.connection, m.connection)
    if cfg.init_from:
        what = (f"`{cfg.init_from}` (a transformers model converted to mHC with {m.n_streams} residual streams), "
                "further trained with torch-mhc")
    else:
        streams = f", {m.n_streams} residual streams" if m.connection != "residual" else ""
        what = (f"{kind} decoder language model trained with torch-mhc: {m.n_layers} layers, width {m.dim}, "
                f"{m.n_heads} heads{streams}, vocabulary {m.vocab_size}, context {m.max_seq_len} tokens"
                f"{', mixture of experts' if m.moe else ''} ({m.variant} variant)")
    lines = ["---", "library_name: transformers", "tags:", "- torch-mhc", "- mhc", "---", "",
             "# torch-mhc model", "", f"This is {what}.", "", "## Training", ""]
    data = cfg.data or "the Python standard library's source (the default corpus)"
    tokens = f"{t['tokens']:,} tokens" if "tokens" in t else "tokens not logged"
    lines += [f"- steps: {t['steps']:,} ({tokens}), batch {cfg.batch_size} x {cfg.seq_len} tokens"
              f"{f' x {cfg.grad_accum} accumulation' if cfg.grad_accum > 1 else ''}",
              f"- data: {data}", f"- tokenizer: {cfg.tokenizer}",
              f"- optimiser: AdamW, lr {cfg.lr:g} ({cfg.schedule} schedule, warmup {cfg.warmup}), "
              f"weight decay {cfg.weight_decay:g}, seed {cfg.seed}"]
    for key, what in (("loss", "training loss"), ("val_loss", "validation loss")):
        if key in t:
            bpb = key.replace("loss", "bpb")
            extra = f", {t[bpb]:.4f} bits per byte" if bpb in t and t[f"{bpb}_step"] == t[f"{key}_step"] else ""
            lines.append(f"- final {what} (step {t[f'{key}_step']:,}): {t[key]:.4f} nats/token{extra}")
    special = ", ".join(f"{r.removesuffix('_token')} `{v}`" for r, v in roles.items())
    lines += ["", "## Tokenizer", ""]
    if tokenizer_name is None:
        lines.append("Not included: the run used the gpt2 tokenizer (tiktoken); load transformers' `gpt2` tokenizer.")
    else:
        lines.append(f"`{tokenizer_name}`; special tokens: {special or 'none'}.")
        if roles.get("eos_token") == END_OF_TEXT and (cfg.tokenizer == "byte" or cfg.tokenizer.startswith("bpe:")):
            lines.append(f"`{END_OF_TEXT}` and `{PAD}` are the tokens of bytes 0xFF and 0xFE, which UTF-8 text "
                         "never holds: the model never saw them, so generation runs to `max_new_tokens`; the "
                         "padding is masked by `attention_mask`.")
    lines += ["", "## Loading", "", "```python"]
    if cfg.init_from:
        lines += ["from transformers import AutoTokenizer",
                  "from torch_mhc.integrations.convert import load_converted  # pip install 'torch-mhc[hf]'", "",
                  'model = load_converted("THIS_DIRECTORY")']
    else:
        lines += ["import torch_mhc.integrations  # registers the model with transformers (pip install "
                  "'torch-mhc[hf]')",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")',
                  "# without torch-mhc installed: from_pretrained(\"THIS_DIRECTORY\", trust_remote_code=True)",
                  "# runs the model code shipped here (modeling_torch_mhc.py, mhc_*.py; PyTorch reference path)"]
    if tokenizer_name is not None:
        lines += ['tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")',
                  'ids = tokenizer("def main():", return_tensors="pt").input_ids',
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=50, do_sample=False)[0]))"]
    lines += ["```", "", "## Config", "", "```json", json.dumps(cfg.to_dict(), indent=2), "```", ""]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out_dir: str | Path, log=print) -> Path:
    """Write the transformers directory of ``run_dir``'s latest checkpoint into ``out_dir`` (new or empty),
    through a temporary directory beside it (renamed into place when complete): the model, its tokenizer
    with its special tokens (:func:`tokenizer_roles`, also set as the model's ``*_token_id``), the model code
    and a model card (``README.md``); files get the usual permissions."""
    from torch_mhc.integrations import require_transformers

    require_transformers()
    from torch_mhc.integrations.hf_model import TorchMhcConfig, TorchMhcForCausalLM
    from torch_mhc.train.evaluate import load_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_new_dir(out_dir)
    model, cfg, state = load_run(run_dir, device="cpu")
    tok = run_tokenizer_for_export(cfg, run_dir, state)
    if cfg.init_from:  # a converted transformers model: saved as such, with its config's conversion record
        from torch_mhc.integrations.convert import save_converted

        hf = model.hf
    else:
        hf = TorchMhcForCausalLM(TorchMhcConfig(mhc=cfg.model.to_dict()))
        hf.model.load_state_dict(model.state_dict())
        hf.config.auto_map = dict(AUTO_MAP)
    backend, roles = tokenizer_roles(cfg, tok, hf.config)
    if backend is not None:
        for key, value in _token_ids(backend, roles).items():  # ids a converted model's config has are kept
            for config in (hf.config, hf.generation_config):
                if getattr(config, key, None) is None:
                    setattr(config, key, value)
    card = model_card(cfg, run_dir, state, roles, None if tok is None else tok.name)
    with new_dir_via_temp(out_dir) as tmp:
        if cfg.init_from:
            save_converted(hf, tmp)
        else:
            hf.save_pretrained(tmp)
            write_model_code(tmp)
        if backend is not None:
            export_tokenizer(cfg, backend, roles, tmp)
        (tmp / "README.md").write_text(card)
        usual_permissions(tmp)
    source = f", from {cfg.init_from}" if cfg.init_from else ""
    log(f"exported {run_dir} (step {state['step']}{source}) to {out_dir}; {_tokenizer_note(tok, roles)}")
    return out_dir
