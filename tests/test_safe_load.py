"""Issue 20 item 1 (and issue 19's distributed integrity): loading a file never runs its code, and a
distributed checkpoint is verified before it is read.

Each payload is a real one: a pickled ``os.system`` call that creates a marker file. A control step
shows that plain unpickling runs it; every torch-mhc door that reads the file must refuse it (exit 2,
the file named) and leave no marker. The payloads come with matching checksums, as a shared file would:
a checksum proves a file is the one written, not that it is safe."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from conftest import TINY
from torch_mhc.cli import main
from torch_mhc.distributed import checkpoint as dck
from torch_mhc.models import DecoderLM, ModelConfig
from torch_mhc.train import checkpoint as ckpt
from torch_mhc.train.config import UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = [*TINY, "model.n_layers=2", "steps=3", "ckpt_every=3", "eval_every=3", "diag_every=3"]


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def payload_is_live(path, marker):
    """Control: plain unpickling (what the code did before) runs the payload, in another process."""
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    live = marker.exists()
    marker.unlink(missing_ok=True)
    return live


def expect_refused(capsys, args, marker, named):
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert named in err and "was not loaded: it asks for the Python global posix.system" in err, err
    assert "Traceback" not in err
    assert not marker.exists(), f"the payload ran under {args}"


def trained_run(tmp_path, small_text, *extra):
    args = [a for s in [*SMALL, f"data={small_text}", f"out_dir={tmp_path / 'runs'}", "run_name=r", *extra]
            for a in ("--set", s)]
    assert main(["train", *args]) == 0
    return tmp_path / "runs" / "r"


def test_payload_in_a_checkpoint_never_runs(tmp_path, small_text, capsys):
    run = trained_run(tmp_path, small_text)
    latest = ckpt.list_checkpoints(run)[-1]
    marker = tmp_path / "PWNED"
    state = ckpt.load_checkpoint(latest)
    state["evil"] = Payload(marker)
    torch.save(state, latest)
    ckpt.write_hash_file(latest, ckpt.file_sha256(latest))  # the checksum matches: it is the file "written"
    ckpt._verified.clear()
    assert payload_is_live(latest, marker)
    out = tmp_path / "out"
    for args in (["train", "--resume", str(run), "--set", "steps=6"], ["eval", str(run)], ["sample", str(run)],
                 ["diagnose", str(run)], ["export", str(run), str(out / "hf")],
                 ["export-weights", str(run), str(out / "w.safetensors")]):
        expect_refused(capsys, args, marker, str(latest))
    assert not (out / "w.safetensors").exists()


def test_compare_resume_refuses_a_payload(tmp_path, small_text, capsys):
    out = tmp_path / "cmp"
    sets = [a for s in [*SMALL, f"data={small_text}", f"out_dir={tmp_path / 'runs'}", "test_fraction=0.2"]
            for a in ("--set", s)]
    assert main(["compare", "--modes", "mhc", *sets, "--out", str(out)]) == 0
    run = next((out / "runs").glob("mhc-*"))
    latest = ckpt.list_checkpoints(run)[-1]
    (run / "result.json").unlink()  # as if the comparison had been stopped before the run's test loss
    marker = tmp_path / "PWNED"
    state = ckpt.load_checkpoint(latest)
    state["evil"] = Payload(marker)
    torch.save(state, latest)
    ckpt.write_hash_file(latest, ckpt.file_sha256(latest))
    ckpt._verified.clear()
    expect_refused(capsys, ["compare", "--resume", str(out)], marker, str(latest))


def dcp_run(tmp_path, optimizer_extra=None):
    """A DecoderLM (2 layers, MoE, V4 variant) and its AdamW, saved as a one-process DCP checkpoint."""
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=2, vocab_size=64, max_seq_len=16, moe=True, n_routed_experts=4,
                      first_dense_layers=1, variant="deepseek-v4", merge="head")
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    if optimizer_extra is not None:
        opt.param_groups[0]["extra"] = optimizer_extra
    path = dck.save_distributed(tmp_path / "run", 1, model, opt, {"config": {"note": "test"}})
    return cfg, model, path


def rewrite_manifest(path):
    """Checksums for the directory as it now is (what someone sharing a tampered checkpoint would do)."""
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != dck.MANIFEST)
    (path / dck.MANIFEST).write_text("".join(f"{ckpt.file_sha256(path / n)}  {n}\n" for n in names))


def test_payloads_in_a_distributed_checkpoint_never_run(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cfg, model, path = dcp_run(tmp_path)
    # trainer.pt
    trainer = path / dck.TRAINER_FILE
    good = trainer.read_bytes()
    torch.save({"step": 1, "config": {}, "evil": Payload(marker)}, trainer)
    rewrite_manifest(path)
    assert payload_is_live(trainer, marker)
    with pytest.raises(UserError, match="was not loaded"):
        dck.load_distributed(path, DecoderLM(cfg))
    expect_refused(capsys, ["export-weights", str(path), str(tmp_path / "w.safetensors")], marker, str(trainer))
    trainer.write_bytes(good)
    # .metadata, which DCP itself reads with plain pickle
    metadata = path / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    rewrite_manifest(path)
    assert payload_is_live(metadata, marker)
    with pytest.raises(UserError, match=r"was not loaded: it asks for the Python global posix\.system"):
        dck.load_distributed(path, DecoderLM(cfg))
    expect_refused(capsys, ["export-weights", str(path), str(tmp_path / "w.safetensors")], marker, str(metadata))
    assert not marker.exists()


def test_payload_in_a_dcp_byte_item_never_runs(tmp_path):
    """DCP stores non-tensor optimizer values as pickled byte items and loads them with weights_only=False."""
    marker = tmp_path / "PWNED"
    cfg, model, path = dcp_run(tmp_path, optimizer_extra=Payload(marker))
    fresh = DecoderLM(cfg)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt.param_groups[0]["extra"] = 0  # asks for the item, as a resumed optimizer would
    with pytest.raises(UserError, match=r"item optim\.param_groups\.0\.extra\).*was not loaded"):
        dck.load_distributed(path, fresh, opt)
    assert not marker.exists()


def test_a_clean_distributed_checkpoint_loads_exactly(tmp_path):
    cfg, model, path = dcp_run(tmp_path)
    assert (path / dck.MANIFEST).read_text().count("\n") == len(list(path.iterdir())) - 1
    fresh = DecoderLM(cfg)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert dck.load_distributed(path, fresh, opt)["step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("damage", ["flip-shard", "flip-trainer", "extra-file", "no-manifest"])
def test_a_damaged_distributed_checkpoint_is_refused(tmp_path, capsys, damage):
    cfg, model, path = dcp_run(tmp_path)
    if damage.startswith("flip"):
        target = next(path.glob("*.distcp")) if damage == "flip-shard" else path / dck.TRAINER_FILE
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])  # 64 flipped bytes, size unchanged
        target.write_bytes(bytes(data))
        message = target.name
    elif damage == "extra-file":
        (path / "__9_0.distcp").write_bytes(b"not ours")
        message = "__9_0.distcp: not listed"
    else:
        (path / dck.MANIFEST).unlink()
        message = "cannot be verified"
    with pytest.raises(UserError, match=message):
        dck.load_distributed(path, DecoderLM(cfg))
    out = tmp_path / "w.safetensors"
    assert main(["export-weights", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert message.split(":")[0] in err and "Traceback" not in err, err
    assert not out.exists()


def test_torchrun_resume_refuses_a_flipped_shard_on_every_rank(tmp_path, small_text):
    """The same promise under torchrun: 2 gloo ranks, a 2-layer MoE model; a shard with 64 flipped bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [a for s in [*SMALL, f"data={small_text}", f"out_dir={tmp_path / 'runs'}", "run_name=d",
                        "model.moe=true", "model.n_routed_experts=4", "model.first_dense_layers=1",
                        "parallel.dp_shard=2"] for a in ("--set", s)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "torch_mhc"]
    p = subprocess.run([*torchrun, "train", *sets], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    path = dck.list_dcp_checkpoints(tmp_path / "runs" / "d")[-1]
    shard = sorted(path.glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])
    shard.write_bytes(bytes(data))
    before = {q: q.read_bytes() for q in path.iterdir()}
    p = subprocess.run([*torchrun, "train", "--resume", str(tmp_path / "runs" / "d"), "--set", "steps=6"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count(f"{shard.name}: SHA-256 differs") == 2, p.stderr[-3000:]  # each rank says why
    assert "src/torch_mhc/" not in p.stderr, p.stderr[-3000:]  # no traceback of ours (torchrun prints its own)
    assert {q: q.read_bytes() for q in path.iterdir()} == before  # nothing rewritten


def test_no_unsafe_load_in_the_package():
    """Every unpickling in src/ goes through torch_mhc.serialization."""
    from pathlib import Path

    import torch_mhc

    root = Path(torch_mhc.__file__).parent
    unpickling = re.compile(r"\bpickle\.load\(|\btorch\.load\(|\bUnpickler\b")
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        if path.name != "serialization.py":
            assert not unpickling.search(text), (path, unpickling.search(text))


def test_token_file_with_pickled_objects_is_refused(tmp_path, capsys):
    """A ``.npy`` data file is read with allow_pickle=False: an object array's payload never runs."""
    import numpy as np

    marker = tmp_path / "PWNED"
    data = tmp_path / "tokens.npy"
    np.save(data, np.array([Payload(marker), 1], dtype=object))
    assert main(["train", "--set", f"data={data}", "--set", f"out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "Traceback" not in err, err
    assert not marker.exists()


HF_DAMAGE = ["truncated-config", "unknown-model-type", "remote-code", "truncated-weights"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers", minversion="5.10")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("damage", HF_DAMAGE)
def test_bad_model_directories_are_named_and_never_run(tmp_path, capsys, llama_dir, damage):
    import json
    import shutil

    hf = tmp_path / damage
    shutil.copytree(llama_dir, hf)
    config = json.loads((hf / "config.json").read_text())
    marker = tmp_path / "PWNED"
    if damage == "truncated-config":
        (hf / "config.json").write_text(json.dumps(config)[:80])
        expected = "is not valid JSON"
    elif damage == "unknown-model-type":
        (hf / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))
        expected = "model_type 'nosuchmodel'"
    elif damage == "remote-code":
        (hf / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        (hf / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
        expected = "asks to run code shipped in the directory"
    else:
        weights = hf / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "cannot load the model"
    out = tmp_path / "converted"
    runs = tmp_path / "runs"
    for args in (["convert", str(hf), str(out)], ["train", "--init-from", str(hf), "--set", f"out_dir={runs}"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert str(hf) in err and expected in err and "Traceback" not in err, err
    assert not marker.exists() and not out.exists()
    assert not runs.exists() or not any(runs.iterdir())  # no run directory left behind
