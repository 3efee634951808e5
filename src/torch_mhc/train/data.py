"""Text -> tokens -> memory-mapped cache -> training and validation windows.

Sources: a text file, a ``.gz`` text file, a directory of text files (recursively, sorted), or a
prepared ``.npy`` token file. With no source, the default corpus is the ``.py`` source of the
running interpreter's standard library (tests excluded): no download needed.

Tokenizers: ``byte`` (UTF-8 bytes), ``gpt2`` (tiktoken, cached encoding), ``bpe:VOCAB`` (a byte-level
BPE trained offline with the ``tokenizers`` library on the training part of the text, cached beside
the tokens) and ``PATH`` (any Hugging Face ``tokenizer.json``, or a directory holding one).

Tokens are cached once as ``.npy`` (uint8 for bytes, uint16/uint32 otherwise) in ``cache_dir``, keyed
by the sources' paths, sizes and modification times and the tokenizer (its content for BPE and
``PATH`` tokenizers); the next run reuses it after checking the tokens against the SHA-256 in the
cache's metadata (a corrupt cache is rebuilt). The
last ``val_fraction`` of the tokens is the validation split. Training windows are random and
contiguous, drawn from a generator seeded by ``(seed, step)``, so the batch of step s is the same
whether or not the run was resumed. Validation uses a fixed, evenly spaced set of windows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torch_mhc.errors import is_read_only, write_failure
from torch_mhc.serialization import write_atomically
from torch_mhc.train.config import UserError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".xml", ".c", ".h", ".js", ""}


class ByteTokenizer:
    """UTF-8 bytes; vocabulary 256; one token per byte, so nats per token convert to bits per byte."""

    name, vocab_size, dtype = "byte", 256, np.uint8

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2 BPE through ``tiktoken`` with its encoding already in the local cache (no download)."""

    name, vocab_size, dtype = "gpt2", 50257, np.uint16

    def __init__(self):
        try:
            import tiktoken

            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
            raise UserError(
                "the gpt2 tokenizer needs the 'tiktoken' package with the GPT-2 encoding already cached "
                f"locally (no download at run time); loading it failed ({type(e).__name__}: {e}). "
                "Use tokenizer=byte, or prepare a .npy token file elsewhere and pass it as data."
            ) from None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint16)

    def decode(self, tokens) -> str:
        return self._enc.decode([int(t) for t in tokens])


HF_HINT = "install the optional extra: pip install 'torch-mhc[hf]'"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"this tokenizer setting needs the 'tokenizers' package; {HF_HINT}.") from None
    return tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (no special tokens added when encoding).

    ``name`` is the setting it came from (``bpe:4096`` or a path); ``cache_key`` adds a hash of
    its ``tokenizer.json``, so a changed tokenizer never reuses another one's token cache.
    """

    def __init__(self, tokenizer, name: str, path: Path | None = None):
        self._tok, self.name, self.path = tokenizer, name, path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        self.cache_key = f"{name}@{hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]}"

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> "HFTokenizer":
        """Load ``tokenizer.json`` (or a directory holding one)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(
                f"tokenizer {path} does not exist{' (no tokenizer.json in that directory)' if path.is_dir() else ''}. "
                "Use tokenizer=byte, gpt2, bpe:VOCAB, or the path of a Hugging Face tokenizer.json "
                "(or of a directory holding one)."
            )
        tokenizers = _import_tokenizers()
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise UserError(f"tokenizer file {file} cannot be read as a Hugging Face tokenizer.json: {e}.") from None
        return cls(tok, name or str(path), file)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def decode(self, tokens) -> str:
        return self._tok.decode([int(t) for t in tokens], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


def _source_texts(files: list[Path]):
    """The texts that :func:`load_tokens` tokenises, in order (a newline after each of several files)."""
    for p in files:
        yield read_text(p) + ("\n" if len(files) > 1 else "")


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (deterministic for equal input)."""
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bpe_tokenizer(spec: str, source: str, cache_dir: str | Path | None, val_fraction: float) -> HFTokenizer:
    """``bpe:VOCAB``: train a byte-level BPE on the text before the validation split, or reuse the one
    cached in ``cache_dir/bpe-KEY/tokenizer.json`` (KEY: sources, their sizes and mtimes, VOCAB, val_fraction)."""
    try:
        vocab_size = int(spec.split(":", 1)[1])
    except ValueError:
        vocab_size = 0
    if vocab_size < 257:
        raise UserError(f"tokenizer={spec!r}: give the vocabulary size as bpe:VOCAB with VOCAB >= 257 (e.g. bpe:4096).")
    if source.endswith(".npy"):
        raise UserError(f"tokenizer={spec} trains on text, but data={source} is a prepared token file.")
    files = list_source_files(source)
    key = _fingerprint(files, f"{spec}|{val_fraction}")
    path = Path(cache_dir or ".") / f"bpe-{key}" / "tokenizer.json"
    if path.is_file():
        return HFTokenizer.from_file(path, name=spec)
    texts = list(_source_texts(files))
    keep = int(sum(len(t) for t in texts) * (1 - val_fraction))  # characters of the training part
    train_texts = []
    for t in texts:
        train_texts.append(t[: max(0, keep)])
        keep -= len(t)
    tok = HFTokenizer(train_bpe([t for t in train_texts if t], vocab_size), spec)
    if cache_dir is not None:
        write_atomically(path, tok.save, note="the tokenizer cache was not written")
        tok.path = path
    return tok


def bytes_per_token(meta: dict, tokenizer) -> float | None:
    """Source bytes per token (for bits per byte): from the tokenised text, 1 for byte tokens of a
    prepared file, unknown otherwise."""
    if meta.get("bytes"):
        return meta["bytes"] / max(1, meta["tokens"])
    return 1.0 if tokenizer.name == "byte" else None


def get_tokenizer(name: str, source: str = "", cache_dir: str | Path | None = None, val_fraction: float = 0.02):
    """``byte``, ``gpt2``, ``bpe:VOCAB`` (trained on ``source``'s training part, cached in ``cache_dir``)
    or the path of a ``tokenizer.json`` (or of a directory holding one)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name.startswith("bpe:"):
        return bpe_tokenizer(name, source, cache_dir, val_fraction)
    return HFTokenizer.from_file(name)


# A run's own tokenizer: ``RUN_DIR/tokenizer.json``, written once when the run starts, its SHA-256 recorded
# in every checkpoint (``tokenizer``: ``{"name", "sha256"}``). byte and gpt2 are fixed by their name alone.
RUN_TOKENIZER = "tokenizer.json"
NAMED_TOKENIZERS = ("byte", "gpt2")


def _tokenizer_bytes(tokenizer: HFTokenizer) -> bytes:
    return tokenizer._tok.to_str(pretty=True).encode()


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint records of its run's tokenizer: the setting and, for a stored ``tokenizer.json``,
    the SHA-256 of the file's bytes."""
    if tokenizer.name in NAMED_TOKENIZERS:
        return {"name": tokenizer.name}
    return {"name": tokenizer.name, "sha256": hashlib.sha256(_tokenizer_bytes(tokenizer)).hexdigest()}


def store_run_tokenizer(run_dir: str | Path, tokenizer) -> dict:
    """Write ``tokenizer`` as ``RUN_DIR/tokenizer.json`` (temporary file + rename; nothing for byte and gpt2)
    and return its :func:`tokenizer_record`."""
    record = tokenizer_record(tokenizer)
    if "sha256" in record:
        from torch_mhc.train.rundir import atomic_write_text

        atomic_write_text(Path(run_dir) / RUN_TOKENIZER, _tokenizer_bytes(tokenizer).decode())
    return record


def load_run_tokenizer(run_dir: str | Path, record: dict):
    """The tokenizer a checkpoint's ``record`` names: byte or gpt2 by name, anything else only from
    ``RUN_DIR/tokenizer.json`` with the recorded SHA-256 (UserError naming the file otherwise)."""
    name = record.get("name")
    if name in NAMED_TOKENIZERS:
        return get_tokenizer(name)
    path = Path(run_dir) / RUN_TOKENIZER
    digest = record.get("sha256")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"the run's tokenizer {path} is missing: run {run_dir} trained with the {name} tokenizer stored there "
            "(its SHA-256 is recorded in the checkpoint), and no other tokenizer gives the model's token ids their "
            "meaning. Restore the file from a copy of the run."
        ) from None
    except OSError as e:
        raise UserError(f"the run's tokenizer {path} cannot be read ({e.strerror}).") from None
    found = hashlib.sha256(raw).hexdigest()
    if not isinstance(digest, str) or found != digest:
        raise UserError(
            f"the run's tokenizer {path} does not match the SHA-256 recorded in the run's checkpoint "
            f"({str(digest)[:12]}..., the file has {found[:12]}...): it was changed after run {run_dir} started, and "
            "no other tokenizer gives the model's token ids their meaning. Restore the file from a copy of the run."
        )
    tokenizers = _import_tokenizers()
    try:
        tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise UserError(f"the run's tokenizer {path} cannot be read as a tokenizer.json: {e}.") from None
    return HFTokenizer(tok, name, path)


def run_tokenizer(run_dir: str | Path, cfg, state: dict):
    """The tokenizer run ``run_dir`` trained with, for a checkpoint ``state`` of it: the one stored in the
    run directory (:func:`load_run_tokenizer`). A run from before stored tokenizers (no record in its
    checkpoint): byte and gpt2 by name; a ``bpe:VOCAB`` or PATH tokenizer is rebuilt as then and used only
    if it still turns the run's data into exactly the tokens the checkpoint's data fingerprint records."""
    record = state.get("tokenizer")
    if record is not None:
        if not isinstance(record, dict):
            raise UserError(f"the checkpoint of run {run_dir} has a malformed tokenizer record ({record!r}).")
        return load_run_tokenizer(run_dir, record)
    if cfg.tokenizer in NAMED_TOKENIZERS:
        return get_tokenizer(cfg.tokenizer)
    cache = Path(run_dir).parent / "cache"
    saved = (state.get("data") or {}).get("sha256")
    why = "its checkpoint has no fingerprint of its training tokens"
    if saved:
        rebuilt = get_tokenizer(cfg.tokenizer, cfg.data, cache, cfg.val_fraction)
        _, meta = load_tokens(cfg.data, rebuilt, cache)
        if meta["sha256"] == saved:
            return rebuilt
        why = (f"the {cfg.tokenizer} tokenizer rebuilt now turns {cfg.data or 'the default corpus'} into other "
               "tokens than the run trained on (the data or the tokenizer file changed)")
    raise UserError(
        f"run {run_dir} predates stored tokenizers (no {RUN_TOKENIZER} in it, no tokenizer record in its "
        f"checkpoint) and its {cfg.tokenizer} tokenizer cannot be recovered: {why}. Restore the data the run "
        "trained on (then this works and a resume stores the tokenizer), or start a new run."
    )


def default_corpus_dir() -> Path:
    """The running interpreter's standard library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(source: str) -> list[Path]:
    """The files a data source stands for (sorted); raises UserError when there are none."""
    if not source:
        root = default_corpus_dir()
        skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
        files = [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts[:-1])]
        if not files:
            raise UserError(f"the default corpus (Python standard library at {root}) has no .py files.")
        return files
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"data source {path} does not exist. Pass a text file, a .gz file, a directory or a .npy token file."
        )
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".gz")]
        if not files:
            kinds = ", ".join(sorted(s for s in TEXT_SUFFIXES if s))
            raise UserError(f"data directory {path} contains no text files ({kinds}, .gz).")
        return files
    check_regular_file(path, "data source")
    return [path]


def check_regular_file(path: Path, what: str) -> None:
    """UserError unless ``path`` is a regular file (a FIFO would block the read, a device never end it)."""
    import stat

    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise UserError(f"{what} {path} is {kind}, not a regular file or a directory: it cannot be read as data "
                        "(a pipe would wait for a writer, a device never ends). Pass a text file, a .gz file, a "
                        "directory or a .npy token file.")


def read_text(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        kind = "a corrupt or truncated gzip stream" if path.suffix == ".gz" else "unreadable"
        raise UserError(f"cannot read data file {path} ({kind}): {e}.") from None
    return raw.decode("utf-8", errors="replace")


def _fingerprint(files: list[Path], tokenizer: str) -> str:
    h = hashlib.sha256(tokenizer.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokens_sha256(tokens: np.ndarray, chunk: int = 1 << 24) -> str:
    """SHA-256 of a token array's values (in its dtype), read in chunks from a memory map."""
    h = hashlib.sha256(f"{tokens.dtype.str}|{tokens.size}|".encode())
    for i in range(0, tokens.size, chunk):
        h.update(np.ascontiguousarray(tokens[i : i + chunk]).tobytes())
    return h.hexdigest()


def check_token_range(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    """UserError unless every token id is in ``[0, vocab_size)``."""
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise UserError(f"{what} holds token id {bad}, outside [0, {vocab_size}) (model.vocab_size={vocab_size}).")


def _read_cache(cache: Path, meta_path: Path) -> tuple[np.ndarray, dict] | None:
    """The cached tokens and metadata when both are readable and the tokens match the recorded
    SHA-256; None (with a warning) for a corrupt cache, which the caller rebuilds."""
    if not (cache.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(cache, mmap_mode="r", allow_pickle=False)
        ok = tokens.ndim == 1 and tokens.size == meta["tokens"] and tokens_sha256(tokens) == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "its tokens do not match the SHA-256 in its metadata"
    if ok:
        return tokens, meta
    print(f"warning: token cache {cache} is corrupt ({why}); rebuilding it from the source.", file=sys.stderr)
    return None


def _remove_dead_temps(cache_dir: Path) -> None:
    """Delete temporary cache files left by processes that no longer run (a killed tokenisation)."""
    for p in cache_dir.glob(".tmp*.*"):  # serialization.write_atomically's temporary names: .tmp<pid>.<name>
        pid = p.name[len(".tmp"):].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def load_tokens(source: str, tokenizer, cache_dir: str | Path) -> tuple[np.ndarray, dict]:
    """Token array (memory-mapped) and a description of where it came from, with ``sha256``: a
    fingerprint of the token values."""
    if source.endswith(".npy"):
        path = Path(source)
        if not path.exists():
            raise UserError(f"token file {path} does not exist.")
        check_regular_file(path, "token file")
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"token file {path} is not a readable .npy array: {e}.") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise UserError(f"token file {path} must hold a 1-D integer array, got {tokens.dtype} {tokens.shape}.")
        if tokens.size and int(tokens.min()) < 0:
            raise UserError(f"token file {path} holds negative token id {int(tokens.min())}; token ids are >= 0.")
        return tokens, {"source": str(path), "files": 1, "cached": True, "bytes": None, "tokens": int(tokens.size),
                        "sha256": tokens_sha256(tokens)}
    files = list_source_files(source)
    key = _fingerprint(files, getattr(tokenizer, "cache_key", tokenizer.name))
    cache_dir = Path(cache_dir)
    cache, meta_path = cache_dir / f"tokens-{key}.npy", cache_dir / f"tokens-{key}.json"
    if (found := _read_cache(cache, meta_path)) is not None:
        return found[0], {**found[1], "cached": True}
    pieces, n_bytes = [], 0
    for text in _source_texts(files):
        n_bytes += len(text.encode("utf-8"))  # the bytes of exactly the text that is tokenised
        pieces.append(tokenizer.encode(text))
    tokens = np.concatenate(pieces).astype(tokenizer.dtype) if pieces else np.zeros(0, tokenizer.dtype)
    from torch_mhc.train.rundir import ensure_dir

    meta = {"source": source or f"python-stdlib:{default_corpus_dir()}", "files": len(files), "bytes": n_bytes,
            "tokens": int(tokens.size), "tokenizer": tokenizer.name, "sha256": tokens_sha256(tokens)}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if write_failure(e, cache_dir) != "read-only":
            ensure_dir(cache_dir, "the token cache directory")  # the error, named
            raise
    if is_read_only(cache_dir):  # eval / sample of a run on read-only media
        print(f"warning: the token cache {cache} cannot be written (read-only file system); the tokens are kept "
              "in memory for this command.", file=sys.stderr)
        return tokens, {**meta, "cached": False}
    _remove_dead_temps(cache_dir)
    meta_path.unlink(missing_ok=True)  # no metadata vouches for the cache while it is replaced
    lost = "the token cache was not written"
    write_atomically(cache, lambda tmp: np.save(tmp, tokens), note=lost)
    write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)), note=lost)
    return np.load(cache, mmap_mode="r", allow_pickle=False), {**meta, "cached": False}


def split_off_test(tokens: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(tokens for training and validation, held-out test tokens): the test split is the last
    ``test_fraction`` of the stream, after the validation split, and nothing else reads it."""
    n_test = int(tokens.size * test_fraction)
    return tokens[: tokens.size - n_test], tokens[tokens.size - n_test :]


@dataclass
class TokenData:
    """Train/validation split of one token stream and the windows drawn from it."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    bytes_per_token: float | None
    fingerprint: dict | None = None  # what identifies the tokens (resume checks it); see resume.data_fingerprint

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, seq_len: int, val_fraction: float, bytes_per_token=None, what="data"):
        if tokens.size == 0:
            raise UserError(f"{what} is empty: nothing to train on.")
        n_val = int(tokens.size * val_fraction)
        need = seq_len + 1
        if tokens.size - n_val < need or n_val < need:
            raise UserError(
                f"{what} has {tokens.size} tokens: too short for seq_len={seq_len} with val_fraction={val_fraction} "
                f"(each split needs at least {need} tokens, i.e. at least "
                f"{int(need / min(val_fraction, 1 - val_fraction)) + 1} in all). Use more data or a smaller seq_len."
            )
        return cls(tokens[: tokens.size - n_val], tokens[tokens.size - n_val :], seq_len, bytes_per_token)

    def train_batch(self, step: int, batch_size: int, seed: int, micro: int = 0):
        """Random contiguous windows for one micro-batch, a pure function of (seed, step, micro)."""
        g = torch.Generator().manual_seed(hash((seed, step, micro)) & 0x7FFF_FFFF_FFFF_FFFF)
        starts = torch.randint(0, self.train.size - self.seq_len - 1 + 1, (batch_size,), generator=g)
        return self._windows(self.train, starts.tolist())

    def val_batches(self, batch_size: int, max_batches: int):
        """A fixed sequence of evenly spaced validation windows (non-overlapping where the split allows)."""
        n_windows = min(batch_size * max_batches, max(1, (self.val.size - 1) // self.seq_len))
        last = self.val.size - self.seq_len - 1
        starts = np.linspace(0, last, n_windows).astype(np.int64).tolist()
        for i in range(0, len(starts), batch_size):
            yield self._windows(self.val, starts[i : i + batch_size])

    def _windows(self, arr: np.ndarray, starts: list[int]):
        chunk = np.stack([np.asarray(arr[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(chunk)
        return t[:, :-1], t[:, 1:]
