import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY
from torch_mhc.cli import main
from torch_mhc.train import checkpoint as ckpt
from torch_mhc.train.config import TrainConfig, UserError, build_config
from torch_mhc.train.data import TokenData
from torch_mhc.train.trainer import lr_factor


def read_metrics(run_dir):
    """Last record per step (a resumed run may re-log steps after its checkpoint)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r
    return [records[k] for k in sorted(records)]


def run(args):
    return main(args)


def tiny(tmp_path, data, *extra):
    sets = [*TINY, f"data={data}", f"out_dir={tmp_path / 'runs'}", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_schedule():
    cfg = TrainConfig(steps=100, warmup=10, schedule="step")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(79, cfg) == 1.0 and lr_factor(80, cfg) == 0.316 and lr_factor(90, cfg) == 0.1
    cfg.schedule = "cosine"
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(55, cfg) == pytest.approx(0.55)


@pytest.mark.parametrize("connection,variant", [("mhc", "paper"), ("mhc", "deepseek-v4"), ("hc", "paper"),
                                                ("residual", "paper")])
def test_param_groups(connection, variant):
    from torch_mhc.models import DecoderLM, ModelConfig
    from torch_mhc.nn import HyperHead, StreamConnection

    model = DecoderLM(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=8, connection=connection,
                                  variant=variant, merge="head", moe=True, first_dense_layers=1))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.param_groups(0.1, lr=1e-3, connection_lr_scale=0.1)
    placed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(names.values())  # every parameter in exactly one group
    assert groups[0]["lr"] == 1e-3  # the first group runs at the base lr (the one logged)
    setting = {names[id(p)]: (g["weight_decay"], round(g["lr"], 9)) for g in groups for p in g["params"]}
    # the connection lr reaches every parameter owned by a connection or the head merge, and nothing else
    owned = {f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, (StreamConnection, HyperHead))
             for n, _ in mod.named_parameters(recurse=False)}
    assert owned == {n for n, (_, lr) in setting.items() if lr == 1e-4}
    if connection != "residual":
        assert any(n.startswith("head_merge.") for n in owned)
    decayed = {n.rsplit(".", 1)[-1] for n, (wd, _) in setting.items() if wd and n in owned}
    assert decayed == {"mhc": {"phi"} if variant == "paper" else {"fn"}, "hc": {"w_pre", "w_post", "w_res", "fn"},
                       "residual": set()}[connection] | ({"fn"} if connection != "residual" else set())
    trunk = {n: wd for n, (wd, _) in setting.items() if n not in owned}
    assert all(wd == 0.0 for n, wd in trunk.items() if "norm" in n)  # norm gains are not decayed
    assert all(wd == 0.1 for n, wd in trunk.items() if n.endswith(("qkv.weight", ".w1", "w2.weight", "embed.weight")))
    roles = model.parameter_roles()
    assert {r for r, _ in roles.values()} == {"embed", "attn", "ffn", "head"} | (
        {"connection"} if connection != "residual" else set())


def test_cli_end_to_end(tmp_path, small_text, capsys):
    assert run(["train", *tiny(tmp_path, small_text, "run_name=a")]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "a"
    assert "run directory" in out and str(run_dir / "metrics.jsonl") in out
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb", "tokens", "bpb"):
        assert key in records[-1]
    assert "val_bpb" in records[-1] and "max_composite_fwd_gain" in records[-1]
    assert json.loads((run_dir / "config.json").read_text())["model"]["connection"] == "mhc"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_0000003.pt", "step_0000006.pt"]
    assert any((run_dir / "tb").iterdir())
    assert (run_dir / "diagnostics.jsonl").read_text().count("\n") == 2
    assert run(["eval", str(run_dir)]) == 0
    assert "val_bpb" in json.loads(capsys.readouterr().out)
    assert run(["eval", str(run_dir), "--data", str(small_text)]) == 0
    capsys.readouterr()
    assert run(["sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert run(["sample", str(run_dir), "--prompt", "x", "--max-new-tokens", "5", "--temperature", "1",
                "--top-k", "5"]) == 0


def test_settings_a_connection_does_not_read_are_noted(tmp_path, small_text, capsys):
    """A residual or HC run given mHC settings (a comparison's base config sets them for its mHC arms) names
    them as having no effect; defaults and the settings the connection reads are not named."""
    from torch_mhc.models.decoder import ModelConfig
    from torch_mhc.train.config import ignored_model_settings

    cfg = dict(h_res="circulant", alpha_init=1.0, n_streams=2, learn=["pre", "post"], dim=32)
    assert ignored_model_settings(ModelConfig(connection="mhc", **cfg)) == []
    assert ignored_model_settings(ModelConfig(connection="hc", **cfg)) == ["model.alpha_init=1.0",
                                                                             "model.h_res='circulant'"]
    assert ignored_model_settings(ModelConfig(connection="residual", **cfg)) == [
        "model.n_streams=2", "model.learn=['pre', 'post']", "model.alpha_init=1.0", "model.h_res='circulant'"]
    assert ignored_model_settings(ModelConfig(connection="residual")) == []
    assert run(["train", *tiny(tmp_path, small_text, "run_name=r", "model.connection=residual",
                               "model.bias_init=v4", "steps=2")]) == 0
    assert "note: connection=residual does not read model.bias_init='v4': no effect on this run" in \
        capsys.readouterr().out


def test_resume_equals_uninterrupted(tmp_path, small_text, monkeypatch):
    extra = ["steps=8", "ckpt_every=3", "log_every=1", "eval_every=4", "keep_ckpts=5"]
    assert run(["train", *tiny(tmp_path, small_text, "run_name=full", *extra)]) == 0
    original = TokenData.train_batch

    def crash_at_5(self, step, *a, **k):
        if step == 4:  # 0-based: the 5th step; the last checkpoint is at step 3
            raise KeyboardInterrupt
        return original(self, step, *a, **k)

    monkeypatch.setattr(TokenData, "train_batch", crash_at_5)
    assert run(["train", *tiny(tmp_path, small_text, "run_name=cut", *extra)]) == 130
    monkeypatch.setattr(TokenData, "train_batch", original)
    cut = tmp_path / "runs" / "cut"
    assert [p.name for p in ckpt.list_checkpoints(cut)] == ["step_0000003.pt"]
    assert run(["train", "--resume", str(cut)]) == 0
    full = read_metrics(tmp_path / "runs" / "full")
    resumed = read_metrics(cut)
    assert [r["step"] for r in full] == [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"] and a["grad_norm"] == b["grad_norm"]
        assert a.get("val_loss") == b.get("val_loss")
    sa = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "runs" / "full")[-1])["model"]
    sb = ckpt.load_checkpoint(ckpt.list_checkpoints(cut)[-1])["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_crash_between_write_and_rename(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"a": 1}, {}, keep=3)
    good = ckpt.list_checkpoints(tmp_path)[-1].read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"a": 1}, {}, keep=3)
    monkeypatch.undo()
    files = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    assert files == ["step_0000001.pt", "step_0000001.pt.sha256"]  # no partial file, no leftover temporary
    assert ckpt.list_checkpoints(tmp_path)[-1].read_bytes() == good
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 1


def test_keep_last_k(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000004.pt", "step_0000005.pt"]


# ------------------------------------------------------------------ bad input: exit 2, one paragraph, nothing lost
def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "torch_mhc", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_bad_inputs_exit_2_without_traceback(tmp_path, small_text):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "bad.toml").write_text("steps = [")
    cases = [
        (["train", "--set", f"data={tmp_path / 'missing.txt'}"], "does not exist"),
        (["train", "--set", f"data={tmp_path / 'empty.txt'}"], "empty"),
        (["train", "--set", f"data={tmp_path / 'short.txt'}"], "too short"),
        (["train", "--set", "model.bogus=1"], "unknown config key 'model.bogus'"),
        (["train", "--set", "steps=many"], "cannot read steps='many'"),
        (["train", "--set", "model.n_streams=0"], "n_streams must be >= 1"),
        (["train", "--set", "model.dim=30", "--set", "model.n_heads=4"], "divisible by n_heads"),
        (["train", "--set", "lr=-1"], "lr must be > 0"),
        (["train", "--config", str(tmp_path / "nope.toml")], "does not exist"),
        (["train", "--config", str(tmp_path / "bad.toml")], "not valid TOML"),
        (["train", "--resume", str(tmp_path / "no-run")], "does not exist"),
        (["train", "--resume", str(tmp_path)], "has no checkpoint"),
        (["eval", str(tmp_path)], "has no checkpoint"),
    ]
    for args, message in cases:
        r = _cli(args, tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/metrics.jsonl"))
    r = _cli(["--debug", "train", "--set", "lr=-1"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_checkpoints(tmp_path, small_text):
    assert run(["train", *tiny(tmp_path, small_text, "run_name=r")]) == 0
    run_dir = tmp_path / "runs" / "r"
    latest = ckpt.list_checkpoints(run_dir)[-1]
    others = {p: p.read_bytes() for p in ckpt.list_checkpoints(run_dir)[:-1]}
    # an existing run is never overwritten
    with pytest.raises(UserError, match="already exists"):
        build_and_start(tmp_path, small_text, "run_name=r")
    # a different model shape
    state = ckpt.load_checkpoint(latest)
    state["config"]["model"]["dim"] = 64
    state["config"]["steps"] = 12
    torch.save(state, latest)
    ckpt.write_hash_file(latest, ckpt.file_sha256(latest))  # a valid checkpoint, of another shape
    r = _cli(["train", "--resume", str(run_dir)], tmp_path)
    assert r.returncode == 2 and "does not fit this model" in r.stderr, r.stderr
    # a truncated file
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    r = _cli(["train", "--resume", str(run_dir)], tmp_path)
    assert r.returncode == 2 and "is corrupt" in r.stderr and "Traceback" not in r.stderr
    assert latest.read_bytes() == data[: len(data) // 2]  # nothing rewritten
    assert all(p.read_bytes() == content for p, content in others.items())


def build_and_start(tmp_path, data, *extra):
    from torch_mhc.train.trainer import start_run

    sets = [*TINY, f"data={data}", f"out_dir={tmp_path / 'runs'}", *extra]
    return start_run(None, sets, log=lambda *_: None)


def test_overrides_and_files(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 7\n[model]\nconnection = "hc"\nlearn = ["res"]\n')
    cfg = build_config(config_file=str(tmp_path / "c.toml"), overrides=["model.n_streams=2", "betas=0.8,0.9"])
    assert cfg.steps == 7 and cfg.model.connection == "hc" and cfg.model.n_streams == 2
    assert cfg.model.learn == ["res"] and cfg.betas == [0.8, 0.9]
    with pytest.raises(UserError, match="section"):
        build_config(overrides=["model=3"])


def test_mhc_config_lists_every_setting_from_the_dataclasses(capsys):
    """`mhc config`: one row per field of TrainConfig, ModelConfig and ParallelConfig (sections flattened), with
    the field's type, TrainConfig()'s default and the comment the dataclass source gives it; none undocumented."""
    import dataclasses
    import typing

    from torch_mhc.distributed.mesh import ParallelConfig
    from torch_mhc.models.decoder import ModelConfig
    from torch_mhc.train.config import field_help, format_default, settings

    cfg = TrainConfig()
    expected = {}
    for prefix, obj, cls in (("", cfg, TrainConfig), ("model.", cfg.model, ModelConfig),
                             ("parallel.", cfg.parallel, ParallelConfig)):
        hints, docs = typing.get_type_hints(cls), field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name not in ("model", "parallel") or prefix:
                expected[prefix + f.name] = (hints[f.name], getattr(obj, f.name), docs[f.name])
    rows = {s.key: s for s in settings()}
    assert rows.keys() == expected.keys()
    undocumented = [k for k, s in rows.items() if len(s.help) < 8]
    assert not undocumented, f"give these settings a comment in their dataclass: {undocumented}"
    for key, (typ, default, text) in expected.items():
        assert rows[key].default == default and rows[key].help == text
        assert rows[key].type == (typ.__name__ if typing.get_origin(typ) is None else
                                  f"list[{typing.get_args(typ)[0].__name__}]")
    assert rows["lr"].help == "peak learning rate (AdamW)" and rows["model.dim"].default == 128
    assert "activation checkpointing" in rows["model.activation_checkpoint"].help  # a comment above the field
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for key, s in rows.items():
        line = next(line for line in lines if line.split()[:1] == [key])
        assert f" {s.type} " in line and f" {format_default(s.default)} " in line and line.endswith(s.help), line
    assert main(["config", "model", "lr"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert keys == [k for k in rows if k.startswith("model.") or k == "lr"]
    assert main(["config", "modle"]) == 2
    assert "Did you mean: the section model" in capsys.readouterr().err


def test_cli_version_and_defaults_in_every_help(capsys):
    """`mhc --version`; every subcommand's --help shows each option's default; `train --help` points at
    `mhc config`."""
    import argparse

    import torch_mhc
    from torch_mhc.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"mhc {torch_mhc.__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "eval", "sample", "compare", "plot", "export", "convert", "config"} <= commands.keys()
    shown = 0
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            default = action.default
            if default is None or default is False or default in (argparse.SUPPRESS, "", []):
                continue
            value = repr(default) if isinstance(default, str) and not default.strip() else str(default)
            assert f"(default: {value})" in text or "default" in (action.help or "").lower(), (name, action.dest)
            shown += 1
    assert shown >= 8
    assert "(default: 50)" in " ".join(commands["eval"].format_help().split())
    train_help = " ".join(commands["train"].format_help().split())
    assert "mhc config" in train_help and "type, default and meaning" in train_help


def test_wrong_key_shows_close_matches_with_types_and_defaults(tmp_path):
    """A misspelt key names the settings it resembles with their types, defaults and meanings, a key in the
    wrong section its right place; nothing close: the section's keys."""
    with pytest.raises(UserError) as e:
        build_config(overrides=["model.n_stream=2"])
    assert ("unknown config key 'model.n_stream'. Did you mean: model.n_streams (int, default 4): residual streams n"
            in str(e.value)) and "`mhc config`" in str(e.value)
    with pytest.raises(UserError, match=r"Did you mean: lr \(float, default 0.003\): peak learning rate"):
        build_config(overrides=["model.lr=1e-3"])
    (tmp_path / "c.toml").write_text("[model]\nsinkhorn_iter = 5\n")
    with pytest.raises(UserError, match=r"model.sinkhorn_iters \(int, default 20\): Sinkhorn-Knopp rounds"):
        build_config(config_file=str(tmp_path / "c.toml"))
    with pytest.raises(UserError, match=r"unknown config key 'zzz'. Keys: adam_eps, batch_size, "):
        build_config(overrides=["zzz=1"])
    (tmp_path / "d.toml").write_text("[modle]\ndim = 64\n")
    with pytest.raises(UserError, match=r"unknown config key 'modle'. Did you mean: the section model \(model.KEY\)"):
        build_config(config_file=str(tmp_path / "d.toml"))
