"""The per-GPU memory estimate: states are 16 bytes per parameter over the shards; TP divides the
activations; the paper configs give the README's table."""

import pytest

from conftest import REPO
from torch_mhc.distributed.memory import memory_per_gpu, parse_layout
from torch_mhc.models import DecoderLM
from torch_mhc.train.config import build_config


def test_memory_estimate_scales_with_the_layout():
    cfg = build_config(overrides=["model.dim=64", "model.n_layers=2", "model.n_heads=4"])
    n = DecoderLM(cfg.model).num_params()
    one = memory_per_gpu(cfg, parse_layout("dp_shard=1,dp_mode=ddp"))
    fsdp = memory_per_gpu(cfg, parse_layout("dp_shard=8"))
    tp = memory_per_gpu(cfg, parse_layout("tp=4,dp_shard=2"))
    assert one["states"] * 2**30 == pytest.approx(16 * n)
    assert fsdp["states"] == pytest.approx(one["states"] / 8) == pytest.approx(tp["states"])
    assert tp["activations"] == pytest.approx(one["activations"] / 4)
    assert one["gathered"] == 0 and fsdp["gathered"] > 0


def test_paper_27b_fits_80gb_with_tp8():
    cfg = build_config(config_file=str(REPO / "configs" / "paper-27b.toml"))
    m = memory_per_gpu(cfg, parse_layout("tp=8,dp_shard=8"))
    assert 20 < m["params_b"] < 35 and m["total"] < 80
    assert memory_per_gpu(cfg, parse_layout("dp_shard=8"))["total"] > 80
