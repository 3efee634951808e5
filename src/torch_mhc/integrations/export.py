"""``mhc export RUN_DIR OUT_DIR``: a run's latest checkpoint as a transformers model directory.

OUT_DIR holds ``config.json`` (with ``auto_map``), ``model.safetensors``, ``generation_config.json``,
the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``; byte and BPE/PATH tokenizers)
and the model code: ``modeling_torch_mhc.py`` (this package's ``hf_model.py``) and flat copies of
the model's modules (``mhc_decoder.py``, ``mhc_connections.py``, ...) with their ``torch_mhc``
imports made relative. ``trust_remote_code=True`` loads that code where ``torch_mhc`` is not
installed (PyTorch reference path; the fused kernels stay in ``torch_mhc``); where it is,
``import torch_mhc.integrations`` registers the classes and no remote code is needed.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from torch_mhc.errors import write_error
from torch_mhc.train.config import UserError

PACKAGE = Path(__file__).resolve().parents[1]
# the model's modules and their flat names in an exported directory
VENDORED = {
    "torch_mhc.models.decoder": "mhc_decoder",
    "torch_mhc.models.moe": "mhc_moe",
    "torch_mhc.nn": "mhc_nn",
    "torch_mhc.nn.connections": "mhc_connections",
    "torch_mhc.nn.functional": "mhc_functional",
    "torch_mhc.nn.recompute": "mhc_recompute",
    "torch_mhc.nn.sinkhorn": "mhc_sinkhorn",
    "torch_mhc.nn.streams": "mhc_streams",
    "torch_mhc.numerics": "mhc_numerics",
}
OPS_STANDIN = '''"""Stand-in for ``torch_mhc.ops`` in exported model code: always the PyTorch reference path
(the fused Triton kernels ship with the torch_mhc package)."""


class ops:
    @staticmethod
    def should_fuse(x) -> bool:
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


def export_tokenizer(cfg, tok, out_dir: Path) -> str:
    """Save the run's tokenizer ``tok`` (:func:`run_tokenizer_for_export`) as transformers files; returns what
    was done (for the message)."""
    from transformers import PreTrainedTokenizerFast

    from torch_mhc.train.data import HFTokenizer

    if tok is None:
        return "tokenizer: not exported (gpt2 comes from tiktoken; load transformers' GPT-2 tokenizer instead)"
    backend = tok._tok if isinstance(tok, HFTokenizer) else byte_hf_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=cfg.model.max_seq_len).save_pretrained(out_dir)
    return f"tokenizer: {tok.name} ({tok.vocab_size} tokens)"


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


def export_run(run_dir: str | Path, out_dir: str | Path, log=print) -> Path:
    """Write the transformers directory of ``run_dir``'s latest checkpoint into ``out_dir`` (new or empty),
    through a temporary directory beside it (renamed into place when complete)."""
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

        with new_dir_via_temp(out_dir) as tmp:
            save_converted(model.hf, tmp)
            note = export_tokenizer(cfg, tok, tmp)
        log(f"exported {run_dir} (step {state['step']}, from {cfg.init_from}) to {out_dir}; {note}")
        return out_dir
    hf = TorchMhcForCausalLM(TorchMhcConfig(mhc=cfg.model.to_dict()))
    hf.model.load_state_dict(model.state_dict())
    hf.config.auto_map = dict(AUTO_MAP)
    with new_dir_via_temp(out_dir) as tmp:
        hf.save_pretrained(tmp)
        note = export_tokenizer(cfg, tok, tmp)
        write_model_code(tmp)
    log(f"exported {run_dir} (step {state['step']}) to {out_dir}; {note}")
    return out_dir
