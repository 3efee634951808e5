import pytest
import torch

from conftest import TINY
from torch_mhc.cli import main
from torch_mhc.diagnostics import amax_gains, backward_gain, coefficient_stats, composites, forward_gain
from torch_mhc.diagnostics.collect import collect_diagnostics, connection_alpha, dynamic_logits
from torch_mhc.diagnostics.gains import logit_spread, saturation_stats, stream_stats
from torch_mhc.models import DecoderLM, ModelConfig


def test_gains_on_handmade_matrices():
    eye = torch.eye(4)
    perm = eye[[2, 0, 3, 1]]
    assert forward_gain(eye) == backward_gain(eye) == 1
    assert forward_gain(perm) == backward_gain(perm) == 1
    m = torch.tensor([[1.0, -2.0], [0.5, 0.25]])  # |rows| 3, 0.75; |columns| 1.5, 2.25
    assert forward_gain(m).item() == 3.0 and backward_gain(m).item() == 2.25
    uniform = torch.full((4, 4), 0.25)
    assert forward_gain(uniform) == pytest.approx(1.0) and backward_gain(uniform) == pytest.approx(1.0)


def test_composite_order_is_explicit_product():
    torch.manual_seed(0)
    h = torch.randn(5, 3, 3)
    comp = composites(h)
    for layer in range(5):
        expected = torch.eye(3, dtype=torch.float64)
        for i in range(layer, 5):  # x_{i+1} = H_i x_i: later layers multiply on the left
            expected = h[i].double() @ expected
        torch.testing.assert_close(comp[layer], expected)
    g = amax_gains(h)
    assert g["composite_fwd"][4] == pytest.approx(forward_gain(h[4].double()).item())
    assert g["composite_bwd"][0] == pytest.approx(backward_gain(comp[0]).item())


def test_stats():
    n = 3
    h_res = torch.eye(n).expand(10, n, n)
    s = coefficient_stats(torch.full((10, n), 0.5), torch.ones(10, n), h_res)
    assert s["res_dist_identity"] == 0 and s["res_row_err"] == 0 and s["pre_mean"] == 0.5
    assert s["res_dist_uniform"] == pytest.approx(torch.linalg.matrix_norm(torch.eye(n) - 1 / n).item())


@pytest.mark.parametrize("connection", ["residual", "hc", "mhc"])
def test_collect_from_model(connection):
    torch.manual_seed(1)
    model = DecoderLM(ModelConfig(dim=16, n_layers=2, n_heads=2, max_seq_len=8, connection=connection))
    d = collect_diagnostics(model, torch.randint(0, 256, (2, 8)), step=0)
    assert len(d["layers"]) == 4 and len(d["gains"]["composite_fwd"]) == 4
    if connection == "residual":
        assert d["summary"]["max_composite_fwd_gain"] == 1.0
    if connection == "mhc":  # uniform H_res at init: every gain is 1 (up to the Sinkhorn eps)
        assert d["summary"]["max_composite_bwd_gain"] == pytest.approx(1.0, abs=1e-4)
    assert all(not c.record and "pre" not in c.__dict__ for c in model.connections())


def test_stream_stats_on_handmade_streams():
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    copies = x[:, :1].expand(5, 3, 8)
    h_pre = torch.tensor([0.5, 0.25, 0.25]).expand(5, 3)
    h_post = torch.tensor([2.0, 1.0, 1.0]).expand(5, 3)
    s = stream_stats(copies, h_pre, h_post)
    assert s["stream_copy_dist"] == pytest.approx(0.0, abs=1e-12)
    assert s["read_share"] == pytest.approx([0.5, 0.25, 0.25]) and s["write_share"] == pytest.approx([0.5, 0.25, 0.25])
    assert s["max_read_share"] == pytest.approx(0.5)
    # two streams x and -x: mean 0, so the spread is all of the norm
    opposite = torch.stack([x[:, 0], -x[:, 0]], dim=1)
    assert stream_stats(opposite, h_pre[:, :2], h_post[:, :2])["stream_copy_dist"] == pytest.approx(1.0)
    # one stream zero, the other x: spread |x/2|^2 * 2 over |x|^2 = 1/2
    half = torch.stack([x[:, 0], torch.zeros_like(x[:, 0])], dim=1)
    assert stream_stats(half, h_pre[:, :2], h_post[:, :2])["stream_copy_dist"] == pytest.approx(0.5 ** 0.5)


def test_saturation_and_logit_spread_on_handmade_values():
    h_pre = torch.tensor([[0.01, 0.5], [0.99, 0.98]])  # 0.01, 0.99 and 0.98 lie outside (0.02, 0.98)
    h_post = torch.tensor([[0.05, 1.0], [1.9, 0.1]])  # only 0.05 is below 0.1
    h_res = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    s = saturation_stats(h_pre, h_post, h_res)
    assert s == {"pre_saturated": 0.75, "post_saturated": 0.25, "res_zero_frac": 0.25}
    n = 2
    logits = torch.zeros(4, 2 * n + n * n, dtype=torch.float64)
    logits[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # sd 1 on one of the two pre columns
    logits[:, 2 * n:] = torch.tensor([0.0, 2.0, 0.0, 2.0])[:, None]  # sd 1 on every res column
    spread = logit_spread(logits, n)
    assert spread == pytest.approx({"pre_logit_spread": 0.5, "post_logit_spread": 0.0, "res_logit_spread": 1.0})


@pytest.mark.parametrize("connection", ["hc", "mhc"])
def test_dynamic_logits_are_the_connections_own(connection):
    """Bias/static part plus the recorded dynamic logits reproduce the connection's coefficients."""
    torch.manual_seed(3)
    model = DecoderLM(ModelConfig(dim=16, n_layers=1, n_heads=2, max_seq_len=8, connection=connection, n_streams=3))
    conn = model.connections()[1]
    with torch.no_grad():
        for p in conn.parameters(recurse=False):
            p.add_(0.3 * torch.randn_like(p))
    streams = torch.randn(2, 5, 3, 16)
    h_pre, h_post, h_res = conn.coefficients(streams)
    logits = dynamic_logits(conn, streams)
    assert logits.shape == (2, 5, 3 * 2 + 9)
    if connection == "mhc":
        bias = conn.bias.double()
        torch.testing.assert_close(torch.sigmoid(logits[..., :3] + bias[:3]).float(), h_pre, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(2 * torch.sigmoid(logits[..., 3:6] + bias[3:6]).float(), h_post,
                                   rtol=1e-5, atol=1e-6)
        assert connection_alpha(conn) == pytest.approx(conn.alpha.tolist())
    else:
        torch.testing.assert_close((conn.static_pre.double() + logits[..., :3]).float(), h_pre, rtol=1e-5, atol=1e-6)
        res = conn.static_res.t().double() + logits[..., 6:].unflatten(-1, (3, 3))
        torch.testing.assert_close(res.float(), h_res, rtol=1e-5, atol=1e-6)


def test_collected_layers_hold_alpha_and_stream_health():
    torch.manual_seed(2)
    model = DecoderLM(ModelConfig(dim=16, n_layers=2, n_heads=2, max_seq_len=8, connection="mhc"))
    d = collect_diagnostics(model, torch.randint(0, 256, (2, 8)), step=5)
    for layer, conn in zip(d["layers"], model.connections()):
        assert layer["alpha"] == pytest.approx(conn.alpha.tolist())
        for key in ("pre_saturated", "post_saturated", "res_zero_frac", "stream_copy_dist", "read_share",
                    "write_share", "pre_logit_spread", "res_logit_spread"):
            assert key in layer
    assert d["layers"][0]["stream_copy_dist"] < 1e-6  # the first sublayer reads n copies of the embedding
    assert d["layers"][-1]["stream_copy_dist"] > 0
    alphas = [abs(a) for c in model.connections() for a in c.alpha.tolist()]
    assert d["summary"]["max_abs_alpha"] == pytest.approx(max(alphas))


def test_fixed_h_res_reports_no_underflow():
    torch.manual_seed(2)
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, max_seq_len=8, connection="mhc", learn=["pre", "post"])
    model = DecoderLM(cfg)
    d = collect_diagnostics(model, torch.randint(0, 256, (2, 8)), step=1)
    assert "res_zero_frac" not in d["layers"][0] and "max_res_zero_frac" not in d["summary"]
    assert "pre_saturated" in d["layers"][0]


def test_plot_and_diagnose_a_run(tmp_path, small_text, capsys):
    sets = [*TINY, f"data={small_text}", f"out_dir={tmp_path / 'runs'}"]
    for name, conn in (("hc", "hc"), ("mhc", "mhc")):
        args = [a for s in [*sets, f"run_name={name}", f"model.connection={conn}"] for a in ("--set", s)]
        assert main(["train", *args]) == 0
    runs = tmp_path / "runs"
    assert main(["plot", str(runs / "hc"), str(runs / "mhc"), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "gains.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(["diagnose", str(runs / "mhc")]) == 0
    assert "comp fwd" in capsys.readouterr().out
    assert (runs / "mhc" / "diagnose" / "gains.png").is_file()
    (tmp_path / "empty_run").mkdir()
    assert main(["plot", str(tmp_path / "empty_run")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
