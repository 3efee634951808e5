"""The per-GPU memory estimate (``mhc memory``): its activation terms agree with what autograd saves
(saved-tensor hooks, bf16, the mHC kernels through Triton's interpreter) within 10% per layer; states are
16 bytes per parameter over the shards; FSDP2 adds a block's gathered parameters and unsharded gradients;
activation checkpointing keeps block inputs and one block; layouts ``mhc train`` refuses are marked."""

import dataclasses

import pytest
import torch

from conftest import REPO
from torch_mhc.cli import main
from torch_mhc.distributed.memory import (
    SavedBytes,
    activation_bytes_per_token,
    block_params,
    layer_activation_bytes,
    memory_per_gpu,
    memory_table,
    moe_params,
    parse_layout,
)
from torch_mhc.models import DecoderLM
from torch_mhc.models.decoder import ModelConfig, run_blocks
from torch_mhc.train.config import build_config


def measured_layer_bytes(cfg: ModelConfig, layer: int, batch: int = 2, seq: int = 64) -> float:
    """Bytes per token autograd saves in block ``layer`` (bf16 model, input state from the blocks before)."""
    torch.manual_seed(0)
    model = DecoderLM(cfg).to(torch.bfloat16)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the blocks before, handing block ``layer`` its first read's read-ahead as in a model
        h, ahead = model.enter_streams(idx), None
        for i, block in enumerate(model.blocks[:layer]):
            h, ahead = block(h, model.rope_cos, model.rope_sin, read_ahead=ahead,
                             reader=model.blocks[i + 1].first_reader())
    h.requires_grad_()
    with SavedBytes(model) as saved:
        model.blocks[layer](h, model.rope_cos, model.rope_sin, read_ahead=ahead)
    return saved.bytes / (batch * seq)


@pytest.mark.parametrize("connection", ["mhc", "hc", "residual"])
@pytest.mark.parametrize("n, dim, heads", [(4, 64, 4), (2, 128, 8)])
def test_activation_terms_within_10_percent_of_saved_bytes(connection, n, dim, heads):
    """Layer 1 dense, layer 2 MoE (layer 0 reads the copied embedding, a view: not a typical layer)."""
    pytest.importorskip("triton")
    from torch_mhc.ops import use_backend

    cfg = ModelConfig(vocab_size=64, dim=dim, n_heads=heads, n_layers=3, max_seq_len=64, connection=connection,
                      n_streams=n, moe=True, first_dense_layers=2, n_routed_experts=8, top_k=2, variant="deepseek-v4")
    with use_backend("triton"):  # the GPU path: the fused mHC kernels
        for layer in (1, 2):
            measured, estimate = measured_layer_bytes(cfg, layer), layer_activation_bytes(cfg, layer)
            assert estimate == pytest.approx(measured, rel=0.10), (layer, measured, estimate)
            print(connection, n, dim, "dense" if layer == 1 else "MoE", f"measured/estimate {measured / estimate:.3f}")


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    cfg = ModelConfig(dim=64, n_heads=4, n_layers=4, moe=True, first_dense_layers=1)
    layers = [layer_activation_bytes(cfg, i) for i in range(4)]
    state = 2 * cfg.n_streams * cfg.dim
    unchained = 4 * cfg.n_streams * cfg.dim + 8  # a read after a checkpointed block, without the read-ahead
    assert activation_bytes_per_token(cfg) == pytest.approx(sum(layers))
    assert activation_bytes_per_token(cfg, checkpoint="block") == pytest.approx(4 * state + max(layers) + unchained)
    assert activation_bytes_per_token(cfg, checkpoint="every:2") == pytest.approx(
        layers[0] + layers[2] + unchained + 2 * state + max(layers[1], layers[3]) + unchained)
    ac = dataclasses.replace(cfg, activation_checkpoint="block")  # the config's own setting is the default
    assert activation_bytes_per_token(ac) == activation_bytes_per_token(cfg, checkpoint="block")


@pytest.mark.parametrize("connection", ["mhc", "hc"])
def test_blocks_kept_under_every2_match_saved_bytes(connection):
    """Under every:2 the blocks not checkpointed save what the estimate says (within 10%; the checkpointed
    blocks' inputs and the recompute are not seen by saved-tensor hooks)."""
    pytest.importorskip("triton")
    from torch_mhc.distributed.parallelize import apply_activation_checkpoint
    from torch_mhc.ops import use_backend

    cfg = ModelConfig(vocab_size=64, dim=64, n_heads=4, n_layers=4, max_seq_len=64, connection=connection,
                      moe=True, first_dense_layers=1, n_routed_experts=8, top_k=2, activation_checkpoint="every:2")
    torch.manual_seed(0)
    model = apply_activation_checkpoint(DecoderLM(cfg).to(torch.bfloat16), "every:2")
    idx = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    with use_backend("triton"), SavedBytes(model) as saved:
        run_blocks(model.blocks, model.enter_streams(idx), model.rope_cos, model.rope_sin)
    unchained = 4 * 4 * 64 + 8 if connection == "mhc" else 0
    recompute = max(layer_activation_bytes(cfg, i) for i in (1, 3)) + unchained
    kept = activation_bytes_per_token(cfg) - 2 * (2 * 4 * 64) - recompute
    assert saved.bytes / 128 == pytest.approx(kept, rel=0.10)


def test_memory_estimate_scales_with_the_layout():
    cfg = build_config(overrides=["model.dim=64", "model.n_layers=2", "model.n_heads=4"])
    model = DecoderLM(cfg.model)
    n = model.num_params()
    one = memory_per_gpu(cfg, parse_layout("dp_shard=1,dp_mode=ddp"))
    fsdp = memory_per_gpu(cfg, parse_layout("dp_shard=8"))
    tp = memory_per_gpu(cfg, parse_layout("tp=4,dp_shard=2"))
    assert one["states"] * 2**30 == pytest.approx(16 * n)
    assert fsdp["states"] == pytest.approx(one["states"] / 8) == pytest.approx(tp["states"])
    # sequence parallel splits all but the all-gathered inputs of qkv and w1/w3 (2 C each per sublayer)
    gathered_inputs = 2 * 2 * 64 * cfg.model.n_layers * cfg.seq_len / 2**30
    assert tp["activations"] == pytest.approx((one["activations"] - gathered_inputs) / 4 + gathered_inputs)
    assert one["gathered"] == one["grads"] == 0
    assert fsdp["gathered"] * 2**30 == pytest.approx(4 * max(block_params(model)))  # two bf16 blocks
    assert fsdp["grads"] * 2**30 == pytest.approx(6 * max(block_params(model)))  # bf16 grads + fp32 reduce input
    assert fsdp["total"] == pytest.approx(sum(fsdp[k] for k in ("states", "gathered", "grads", "activations",
                                                                  "logits")))


def test_paper_27b_layouts():
    cfg = build_config(config_file=str(REPO / "configs" / "paper-27b.toml"))
    fsdp64 = memory_per_gpu(cfg, parse_layout("dp_shard=64"))
    assert 20 < fsdp64["params_b"] < 35 and fsdp64["total"] < 80
    assert memory_per_gpu(cfg, parse_layout("dp_shard=8"))["total"] > 80
    block = memory_per_gpu(cfg, parse_layout("dp_shard=64"), checkpoint="block")
    every2 = memory_per_gpu(cfg, parse_layout("dp_shard=64"), checkpoint="every:2")
    assert block["activations"] < every2["activations"] < fsdp64["activations"]
    lines = memory_table(cfg, ["dp_shard=64", "tp=8,dp_shard=8", "dp_shard=64,ep=8", "dp_shard=64,ep=7",
                               "dp_shard=64,ac=block"])
    assert all("refused" not in lines[i] for i in (2, 3, 4, 6))  # TP with MoE and EP run now
    assert "refused by mhc train: parallel.ep (7) must divide parallel.dp_shard (64)" in lines[5]
    assert f"{block['total']:.1f}" in lines[6]


def test_expert_parallel_shrinks_only_what_fsdp_gathers_of_moe_blocks():
    """EP keeps the states (experts sharded over ep x dp_shard_mod_ep = dp_shard either way) and the activations
    (balanced load); FSDP2 gathers an MoE block's routed experts over dp_shard / ep ranks only. TP does not split
    the MoE sublayers (they run on each TP rank's share of the tokens)."""
    cfg = build_config(config_file=str(REPO / "configs" / "paper-27b.toml"))
    with torch.device("meta"):
        model = DecoderLM(cfg.model)
    sublayer, experts = moe_params(model)
    assert sum(experts) > 0.8 * model.num_params() and all(e < s for s, e in zip(sublayer[1:], experts[1:]))
    fsdp, ep = (memory_per_gpu(cfg, parse_layout(t)) for t in ("dp_shard=64", "dp_shard=64,ep=8"))
    assert ep["states"] == fsdp["states"] and ep["activations"] == fsdp["activations"]
    i = max(range(len(sublayer)), key=lambda b: block_params(model)[b])
    assert fsdp["gathered"] * 2**30 == pytest.approx(4 * block_params(model)[i])
    assert ep["gathered"] * 2**30 == pytest.approx(4 * (block_params(model)[i] - experts[i] * 7 / 8))
    assert ep["grads"] / fsdp["grads"] == pytest.approx(ep["gathered"] / fsdp["gathered"])
    assert ep["gathered"] < 0.3 * fsdp["gathered"]
    tp = memory_per_gpu(cfg, parse_layout("tp=8,dp_shard=8"))
    n, moe = model.num_params(), sum(sublayer)
    assert tp["states"] * 2**30 == pytest.approx(16 * ((n - moe) / 8 + moe) / 8)


def test_refused_layouts_come_from_the_runtime_check(monkeypatch):
    """mhc memory marks what runtime.layout_problems (the check mhc train runs) says, not a copy of it."""
    from torch_mhc.distributed import runtime

    cfg = build_config(overrides=["model.dim=64", "model.n_heads=4"])
    monkeypatch.setattr(runtime, "layout_problems", lambda cfg, parallel=None: [f"no tp={parallel.tp}"])
    assert "refused by mhc train: no tp=2" in memory_table(cfg, ["tp=2,dp_shard=4"])[2]


def test_dense_tp_is_not_refused_and_bad_layouts_are(capsys):
    cfg = build_config(overrides=["model.dim=64", "model.n_heads=4", "batch_size=16"])
    lines = memory_table(cfg, ["tp=2,dp_shard=4", "tp=3,dp_shard=2", "dp_shard=5"])
    assert "refused" not in lines[2]
    assert "parallel.tp (3) must divide model.n_heads (4)" in lines[3]
    assert "batch_size (16, the global batch) must be divisible" in lines[4]
    config = str(REPO / "configs" / "paper-3b.toml")
    assert main(["memory", config, "dp_shard=8,ac=blocks"]) == 2
    err = capsys.readouterr().err
    assert "ac (none, block or every:K)" in err and "pp, pp_schedule, ep," in err  # every layout key named
    assert main(["memory", config, "dp_shard=8", "--set", "model.activation_checkpoint=block"]) in (0, None)
    assert "activation checkpointing block" in capsys.readouterr().out


def _peak_stage_micro_batches(actions) -> int:
    """The most (stage, micro-batch) activations alive at once in one rank's action list of a PyTorch schedule:
    from its forward to its full backward, or to its weight backward when the backward is split."""
    from torch.distributed.pipelining.schedules import _ComputationType as Action

    live, peak = set(), 0
    for action in (a for a in actions if a is not None):
        for a in action.sub_actions if action.computation_type == Action.OVERLAP_F_B else (action,):
            key = (a.stage_index, a.microbatch_index)
            if a.computation_type == Action.FORWARD:
                live.add(key)
                peak = max(peak, len(live))
            elif a.computation_type in (Action.FULL_BACKWARD, Action.BACKWARD_WEIGHT):
                live.discard(key)
    return peak


@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"])
def test_micro_batches_in_flight_follow_the_schedules_own_order(schedule):
    """micro_batches_in_flight against the action lists PyTorch's multi-stage schedules run (built without
    stages or a process group: each rank's list is a function of pp, stages per rank and the micro-batches)."""
    from torch_mhc.distributed.memory import micro_batches_in_flight
    from torch_mhc.distributed.pipeline import SCHEDULES

    cls, per, _ = SCHEDULES[schedule]
    for pp in (2, 3, 4, 8):
        for m in (pp, 2 * pp, 3 * pp, 4 * pp):
            order = cls.__new__(cls)  # only the attributes _calculate_single_rank_operations reads
            order.pp_group_size, order._n_microbatches, order.n_local_stages = pp, m, per
            order._num_stages = order.num_stages = pp * per
            order.number_of_rounds = max(1, m // pp)
            order.microbatches_per_round = m // order.number_of_rounds
            peak = max(_peak_stage_micro_batches(order._calculate_single_rank_operations(r)) for r in range(pp))
            assert micro_batches_in_flight(schedule, pp, m) == peak / per, (pp, m, peak)


def test_pipeline_activations_follow_the_schedule():
    """1F1B and ZBV keep pp micro-batches of L/pp layers (one model's worth), interleaved 1F1B (3 pp - 1) / 2 of
    them, DualPipeV pp + 1/2; without a pipeline one micro-batch of the whole model; unknown names refused."""
    from torch_mhc.distributed.memory import micro_batches_in_flight

    cfg = build_config(overrides=["model.dim=64", "model.n_layers=8", "model.n_heads=4", "grad_accum=16"])
    one = memory_per_gpu(cfg, parse_layout("dp_shard=1,dp_mode=ddp"))["activations"]
    pp = {s: memory_per_gpu(cfg, parse_layout(f"pp=4,dp_shard=1,pp_schedule={s}"))["activations"]
          for s in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")}
    assert pp["1F1B"] == pytest.approx(one) == pytest.approx(pp["ZBVZeroBubble"])
    assert pp["Interleaved1F1B"] == pytest.approx(one * 11 / 8)
    assert pp["DualPipeV"] == pytest.approx(one * 9 / 8)
    assert micro_batches_in_flight("1F1B", 4, 2) == 2 and micro_batches_in_flight("1F1B", 1, 16) == 1
    with pytest.raises(ValueError, match="unknown pipeline schedule 'GPipe'"):
        micro_batches_in_flight("GPipe", 2, 4)
    moe = build_config(overrides=["model.dim=64", "model.n_heads=4", "grad_accum=4", "model.moe=true",
                                  "model.n_routed_experts=4"])
    assert "refused" not in memory_table(moe, ["pp=2,dp_shard=2,ep=2"])[2]  # PP x FSDP x EP runs now
