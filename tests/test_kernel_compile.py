"""Compile gate: every kernel configuration the fused ops launch compiles for sm_90 and sm_80, without spills.

No GPU needed: the real launch code runs on CPU tensors with Triton's launch intercepted (see
:mod:`torch_mhc.ops.aot`), in a subprocess because the kernels must be ``triton.jit`` functions,
not the interpreter's (this session's conftest turns the interpreter on before triton loads).
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

_NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
if not all(os.path.isfile(os.path.join(_NVIDIA_BIN, tool)) for tool in ("ptxas", "cuobjdump")):
    pytest.skip(f"triton's NVIDIA tools (ptxas, cuobjdump) are not in {_NVIDIA_BIN}", allow_module_level=True)


def _run(code: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_recorder_sees_what_the_jit_specialises():
    """The recorder's view of one launch: argument types, constexprs, 16-divisibility of pointers and ints."""
    code = """
import torch
from torch_mhc import ops
from torch_mhc.ops import aot
with aot.LaunchRecorder() as rec:
    for C in (64, 40):
        x = torch.randn(3, 4, C, dtype=torch.bfloat16)
        ops.fused_stream_pre(x, torch.rand(3, 4))
for launch in rec.launches.values():
    aligned = sorted(launch.fn.arg_names[k[0]] for k in launch.attrs)
    print(launch.name, launch.signature["x_ptr"], launch.signature["C"], aligned)
"""
    proc = _run(code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.split("\n")[-3:-1])
    assert lines[0].startswith("_pre_fwd *bf16 i32 ['C', 'h_ptr', 'x_ptr', 'y_ptr']")
    assert lines[1].startswith("_pre_fwd *bf16 i32 ['h_ptr', 'x_ptr', 'y_ptr']")


def test_every_launched_configuration_compiles_for_sm90_and_sm80():
    proc = _run("import sys; from torch_mhc.ops import aot; sys.exit(aot.main(['--check']))")
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, "\n".join(
        [line for line in proc.stdout.splitlines() if "error" in line or "spill" in line or "budget" in line][:40]
        + [proc.stdout.splitlines()[-1] if proc.stdout else "", proc.stderr[-3000:]])
    summary = proc.stdout.splitlines()[-1]
    assert "0 failing" in summary and " 0 configurations" not in summary


def test_sublayer_launch_and_op_budget():
    """One sublayer forward+backward: 4 kernels each way (3 forward inside a stack of connections, where the
    previous post computed the coefficient GEMM), no host sync, and no PyTorch pass over the state: the sublayer
    Functions sum post's, pre's and the coefficient GEMM's dx in one buffer, and under chained backward the
    next sublayer's terms are summed inside this post's backward kernel (the separate ops still leave autograd
    two [T, n, C] adds, which is what the one buffer removes)."""
    code = """
import json, torch
from torch_mhc.ops import aot
for fused in (True, False):
    for n in (2, 4):
        counts = aot.count_sublayer_ops(n=n, C=40, T=24, dtype=torch.bfloat16, variant="deepseek-v4", fused=fused)
        print(json.dumps(dict(counts, fused=fused)))
"""
    proc = _run(code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()[-4:]]
    assert [c["fused"] for c in lines] == [True, True, False, False]
    for counts in lines:
        fwd, bwd = counts["fwd"], counts["bwd"]
        if counts["fused"]:  # a sublayer inside a chain (sorted): no coefficient GEMM forward (read-ahead)
            assert fwd["launches"] == ["_epilogue_fwd", "_post_fwd", "_pre_fwd"]
            assert bwd["launches"] == ["_epilogue_bwd", "_gemm_bwd", "_post_bwd_chain", "_pre_bwd"]
            assert bwd["other_ops"] == ["sum", "sum", "sum", "zeros"]  # + the 1-element zero handed to autograd
        else:
            assert fwd["launches"] == ["_gemm_fwd", "_epilogue_fwd", "_pre_fwd", "_post_fwd"]
            assert bwd["launches"] == ["_post_bwd", "_pre_bwd", "_epilogue_bwd", "_gemm_bwd"]
            assert bwd["other_ops"] == ["sum", "sum", "sum"]  # dphi, dbias, dalpha partials
        assert fwd["state_ops"] == [] and bwd["state_ops"] == ([] if counts["fused"] else ["add", "add"])
        assert fwd["syncs"] == bwd["syncs"] == []
        assert fwd["other_ops"] == []


def test_gate_traces_every_map():
    """Every built-in H_res map has its kernels traced by the gate for every fused n: the on-chip spec of each map
    computed on chip (aot.MAP_SPECS), the k of each one on the logits path (aot.MAP_LOGITS: Sinkhorn-factor
    Kronecker); a map added to nn/maps.py must be added there."""
    from torch_mhc.nn.maps import KroneckerMap, make_h_res
    from torch_mhc.numerics import H_RES_MAPS
    from torch_mhc.ops import COEFFICIENT_STREAMS, MAP_STREAMS, MAX_GEMM_WIDTH, aot, kernel_spec

    traced = {(c["n"], c.get("res_logits"), c.get("res_spec")) for c in aot.GATE_CASES}
    assert all((n, None, None) in traced for n in COEFFICIENT_STREAMS)  # Sinkhorn on chip
    for n in MAP_STREAMS:
        maps = [KroneckerMap(n, factor="sinkhorn")]
        for name in (name for name in H_RES_MAPS if name != "sinkhorn"):  # Sinkhorn: checked above
            try:
                maps.append(make_h_res(name, n))
            except ValueError:  # permutation-mixture at n = 8
                continue
        for m in maps:
            if 2 * n + m.logit_count() > MAX_GEMM_WIDTH:  # the reference path (the permutation mixture at n = 5)
                continue
            spec = kernel_spec(m, 20, "paper")
            if spec[0] == "logits":
                assert m.logit_count() in aot.MAP_LOGITS[n] and (n, m.logit_count(), None) in traced, (m, n)
            else:
                assert spec in aot.MAP_SPECS[n] and (n, None, spec) in traced, (m, n)


SAVED = """
        /*0160*/                   STL [R1], R4 ;                                       /* 0x0000000401007387 */
        /*0200*/                   FADD R24, R24, R19 ;
        /*0e50*/               @P1 CALL.REL.NOINC 0x0e70 ;
        /*0e60*/                   BRA 0x200 ;
        /*0f70*/                   LDL.LU R0, [R1] ;
"""


def test_local_accesses_in_loops(tmp_path):
    """The gate's spill rule: local loads and stores inside a backward branch's range are spills; a register ptxas
    saves once around a loop (STL before, LDL after, as it does in several of our kernels at 8-16 bytes of stack) is
    not. The real case: a kernel holding far more than 255 registers in a loop spills there, and the gate says so."""
    from torch_mhc.ops import aot

    assert aot.local_accesses_in_loops(SAVED) == 0
    assert aot.local_accesses_in_loops(SAVED.replace("FADD R24, R24, R19", "STL [R1+0x4], R24")) == 1
    # other forms: a wide local load, a uniform branch with its predicate before the target
    uniform = SAVED.replace("BRA 0x200", "BRA.U !UP0, 0x200").replace("FADD R24, R24, R19", "LDL.LU.128 R4, [R1+0x10]")
    assert aot.local_accesses_in_loops(uniform) == 1
    script = tmp_path / "hog.py"  # triton.jit reads the kernel's source from its file
    script.write_text("""
import torch, triton, triton.language as tl
from torch_mhc.ops import aot

@triton.jit
def _hog(x_ptr, y_ptr, T, BT: tl.constexpr, BC: tl.constexpr):
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    cs = tl.arange(0, BC)
    for t0 in range(0, T, BT):
        rows = t0 + tl.arange(0, BT)
        x = tl.load(x_ptr + rows[:, None] * BC + cs[None, :], mask=(rows < T)[:, None], other=0.0)
        acc = acc * x + tl.sqrt(acc + x)
    tl.store(y_ptr + tl.arange(0, BT)[:, None] * BC + cs[None, :], acc)

with aot.LaunchRecorder() as rec:
    _hog[(1,)](torch.empty(1), torch.empty(1), 1000, BT=64, BC=128, num_warps=1)
(launch,) = rec.launches.values()
for target in ("sm80", "sm90"):
    usage = aot.compile_launch(launch, aot.TARGETS[target])
    print(usage["stack"], usage["local_in_loops"], aot.problems(launch, usage))
""")
    proc = _run(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines()[-2:]:  # sm_80, sm_90
        stack, in_loops, problems = line.split(" ", 2)
        assert int(stack) > aot.SAVED_STACK_BYTES and int(in_loops) > 0 and "spills" in problems, proc.stdout
