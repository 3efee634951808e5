"""Evaluation and sampling from a run directory's latest checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from torch_mhc.distributed.checkpoint import load_distributed, read_trainer_state
from torch_mhc.models.decoder import DecoderLM
from torch_mhc.train.checkpoint import latest_any_checkpoint, load_checkpoint, load_model_state
from torch_mhc.train.config import TrainConfig, UserError, config_from_dict
from torch_mhc.train.data import TokenData, bytes_per_token, check_token_range, load_tokens, run_tokenizer
from torch_mhc.train.trainer import build_model, evaluate, load_data, resolve_device


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[DecoderLM, TrainConfig, dict]:
    """The model of a run's newest checkpoint, in eval mode on ``device``, with the run's config and the
    checkpoint's state (``step``, ...). The one place eval, sample, diagnose and export load a run: the
    checkpoint is a one-process ``step_*.pt`` file or a torchrun ``dcp_step_*`` directory, whichever is
    newer; this one process reads a distributed checkpoint's shards whole (DCP, no process group)."""
    path = latest_any_checkpoint(run_dir)
    state = read_trainer_state(path) if path.is_dir() else load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    if path.is_dir():
        load_distributed(path, model)
    else:
        load_model_state(model, state["model"], path)
    return model.to(resolve_device(device)).eval(), cfg, state


def evaluate_run(run_dir: str, data: str | None = None, max_batches: int = 50) -> dict:
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise UserError(f"max_batches (--max-batches) must be an integer >= 1 (got {max_batches!r}).")
    model, cfg, state = load_run(run_dir)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    cache = Path(run_dir).parent / "cache"
    tokenizer = run_tokenizer(run_dir, cfg, state)  # the one the run trained with, never a rebuilt one
    if data:
        tokens, meta = load_tokens(data, tokenizer, cache)
        check_token_range(tokens, cfg.model.vocab_size, f"data {data}")
        if tokens.size < cfg.seq_len + 1:
            raise UserError(f"data {data} has {tokens.size} tokens, fewer than one window of {cfg.seq_len + 1}.")
        split = TokenData(tokens[:0], tokens, cfg.seq_len, bytes_per_token(meta, tokenizer))
    else:
        split, _ = load_data(cfg, cache, log=lambda *_: None, tokenizer=tokenizer)
    result = evaluate(model, split.val_batches(cfg.batch_size, max_batches), device, autocast, split.bytes_per_token)
    return {"run_dir": str(run_dir), "step": state["step"], "data": data or "validation split", **result,
            "val_ppl": math.exp(min(result["val_loss"], 50))}


def check_sample_args(prompt: str, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """UserError naming the argument for any value ``sample_run`` cannot use."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens (--max-new-tokens) must be an integer >= 1 (got {max_new_tokens!r}).")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature (--temperature) must be finite and >= 0, 0 being greedy (got {temperature}).")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k (--top-k) must be an integer >= 1, or left out for no limit (got {top_k!r}).")
    try:
        (prompt or "").encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"the prompt (--prompt) is not valid text: {e}. Pass UTF-8 text.") from None


class TextStream:
    """Hands on the text of a growing token sequence as it grows: ``on_text`` gets each new piece once it
    is settled (a trailing incomplete character, decoded as U+FFFD, waits for its next bytes); the pieces
    join to ``decode`` of the whole sequence."""

    def __init__(self, decode, ids: list[int], on_text):
        self.decode, self.ids, self.on_text, self.sent = decode, list(ids), on_text, ""

    def add(self, token: torch.Tensor) -> None:
        self.ids.extend(token.flatten().tolist())
        self._send(self.decode(self.ids).rstrip("\ufffd"))

    def finish(self) -> str:
        text = self.decode(self.ids)
        self._send(text)
        return text

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


def sample_run(run_dir: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0, on_text=None) -> str:
    """The prompt and its continuation, generated with the KV cache; ``on_text(piece)`` gets the text as it comes
    (the prompt's first)."""
    check_sample_args(prompt, max_new_tokens, temperature, top_k)
    model, cfg, state = load_run(run_dir)
    tokenizer = run_tokenizer(run_dir, cfg, state)
    try:
        ids = tokenizer.encode(prompt or "\n")
    except Exception as e:  # noqa: BLE001 - tokenizers raise many types for text they cannot encode
        raise UserError(f"the {tokenizer.name} tokenizer cannot encode the prompt (--prompt): {e}.") from None
    if ids.size == 0:
        raise UserError("the prompt encodes to no tokens.")
    if int(ids.max()) >= cfg.model.vocab_size:
        raise UserError(f"the prompt encodes to token id {int(ids.max())} >= model.vocab_size={cfg.model.vocab_size}.")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    idx = torch.as_tensor(ids.astype("int64"), device=device)[None]
    stream = TextStream(tokenizer.decode, [], on_text or (lambda text: None))
    stream.add(idx)
    model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, on_token=stream.add)
    return stream.finish()
