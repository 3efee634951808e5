"""Evaluation and sampling from a run directory's latest checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from torch_mhc.models.decoder import DecoderLM
from torch_mhc.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_state
from torch_mhc.train.config import TrainConfig, UserError, config_from_dict
from torch_mhc.train.data import TokenData, bytes_per_token, get_tokenizer, load_tokens
from torch_mhc.train.trainer import build_model, evaluate, load_data, resolve_device


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[DecoderLM, TrainConfig, dict]:
    """The model of a run's latest checkpoint, in eval mode on ``device``."""
    path = latest_checkpoint(run_dir)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    load_model_state(model, state["model"], path)
    return model.to(resolve_device(device)).eval(), cfg, state


def evaluate_run(run_dir: str, data: str | None = None, max_batches: int = 50) -> dict:
    model, cfg, state = load_run(run_dir)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    cache = Path(run_dir).parent / "cache"
    if data:
        tokenizer = get_tokenizer(cfg.tokenizer, cfg.data, cache, cfg.val_fraction)
        tokens, meta = load_tokens(data, tokenizer, cache)
        if tokens.size < cfg.seq_len + 1:
            raise UserError(f"data {data} has {tokens.size} tokens, fewer than one window of {cfg.seq_len + 1}.")
        split = TokenData(tokens[:0], tokens, cfg.seq_len, bytes_per_token(meta, tokenizer))
    else:
        split, _ = load_data(cfg, cache, log=lambda *_: None)
    result = evaluate(model, split.val_batches(cfg.batch_size, max_batches), device, autocast, split.bytes_per_token)
    return {"run_dir": str(run_dir), "step": state["step"], "data": data or "validation split", **result,
            "val_ppl": math.exp(min(result["val_loss"], 50))}


def sample_run(run_dir: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0) -> str:
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1.")
    if temperature < 0:
        raise UserError("--temperature must be >= 0 (0 is greedy).")
    model, cfg, _ = load_run(run_dir)
    tokenizer = get_tokenizer(cfg.tokenizer, cfg.data, Path(run_dir).parent / "cache", cfg.val_fraction)
    ids = tokenizer.encode(prompt or "\n")
    if ids.size == 0:
        raise UserError("the prompt encodes to no tokens.")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    idx = torch.as_tensor(ids.astype("int64"), device=device)[None]
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return tokenizer.decode(out[0].tolist())
