"""cggr's Triton kernels for the rotary and SwiGLU backward on active rows (:mod:`cggr.kernels.rows`), their
custom ops (:mod:`cggr.compact.pointwise`) and the ``CGGR_ROW_KERNELS`` switch.

The kernels are compared with the plain PyTorch pieces they stand for (``pointwise.rope_backward``,
``pointwise.swiglu_backward``; those are checked against autograd in ``test_pointwise.py``). They run on the
CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set below before Triton is imported); on a GPU machine
``TRITON_INTERPRET=0 pytest tests/test_row_kernels.py`` runs the same comparisons on CUDA.

Tolerances. The rotary backward is a product and a sum of products per element, computed by both sides in fp32
with the same roundings (the kernel contracts nothing into FMAs) and rounded once to the dtype: bit-exact. The
SwiGLU backward does the same except for the sigmoid, ``1 / (1 + exp(-g))``, whose ``exp`` is a different
implementation on each side (PyTorch's vectorised CPU ``exp``; the kernel's libdevice ``expf``, or a fp64
``exp`` under the interpreter), each within about one fp32 ulp: their sigmoids may differ by a few units of
2^-24. Each result is then within three units of its dtype's last place (one for its own rounding; two where a
sigmoid's last bit flips the rounding of ``silu(g)`` to the dtype, one unit of ``silu(g)``, which moves
``silu(g) * u`` by up to two units of the result) plus that sigmoid difference carried through its formula (the
bound in :func:`_swiglu_bound`); and most elements are exact (where the two sigmoids agree).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cggr import env  # noqa: E402
from cggr.compact import pointwise  # noqa: E402
from cggr.compact.pointwise import rope_backward, rows_of, swiglu_backward, token_rows  # noqa: E402

INTERPRET = env.triton_interpret()
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_kernel = pytest.mark.skipif(not HAS_TRITON or (not INTERPRET and DEVICE == "cpu"),
                                  reason="the Triton kernels need triton, and TRITON_INTERPRET=1 or a CUDA device")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEEDS = [0, 1, 2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _seed_id(s):
    return f"seed={s}"


def _gen(seed, *key) -> torch.Generator:
    """A fresh, reproducible generator per test case (the seed is in the test id)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(repr(key).encode()))


def _randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _subsets(N: int, g: torch.Generator):
    """Row subsets a routing hands a block: none, every row in order (as indices, and as None: no index read),
    some in random order (not sorted)."""
    some = torch.randperm(N, generator=g)[:max(1, (2 * N) // 3)]
    return {"none": torch.zeros(0, dtype=torch.long), "all": torch.arange(N), "every (None)": None, "some": some}


def _on_device(idx):
    return None if idx is None else idx.to(DEVICE)


# --------------------------------------------------------------------------- rotary backward

# (batch, seq, heads, head_dim): half a head not a power of 2 (5); several row blocks (N = 202 rows, 128 a
# block); several head blocks (11 heads of 128, 8 a block); one position per sequence.
ROPE_SHAPES = [(2, 101, 3, 10), (1, 7, 11, 128), (3, 1, 2, 4)]


def _dt_layouts(g, B, S, heads, hd, dtype):
    """``dt`` as the attention's gradient comes: ``[B, heads, S, hd]`` on token-major storage (``token_rows``: a
    view, strides ``(heads*hd, 1)``), on heads-major storage (``token_rows``: a contiguous copy), and two
    other 2-D layouts the kernel reads in place (a column stride of 2; a transposed one)."""
    N, C = B * S, heads * hd
    token_major = _randn(g, B, S, heads, hd, dtype=dtype).transpose(1, 2)
    return {"token_major": token_rows(token_major),
            "heads_major": token_rows(token_major.contiguous()),
            "col_stride_2": _randn(g, N, 2 * C, dtype=dtype)[:, ::2],
            "transposed": _randn(g, C, N, dtype=dtype).t()}


def _cos_sin_layouts(g, B, S, hd, dtype):
    """cos/sin as the stage gets them: ``[1, S, hd]`` expanded over the batch (stride 0), a full ``[B, S, hd]``,
    and flat ``[N, hd]`` rows."""
    c, s = _randn(g, 1, S, hd, dtype=dtype), _randn(g, 1, S, hd, dtype=dtype)
    return {"expanded": (c.expand(B, S, hd), s.expand(B, S, hd)),
            "full": (c.repeat(B, 1, 1), s.repeat(B, 1, 1)),
            "flat": (c.expand(B, S, hd).reshape(B * S, hd), s.expand(B, S, hd).reshape(B * S, hd))}


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_rope_kernel_is_the_reference(seed, dtype):
    from cggr.kernels.rows import rope_rows_backward

    for B, S, heads, hd in ROPE_SHAPES:
        g = _gen(seed, "rope", B, S, heads, hd, dtype)
        dts = _dt_layouts(g, B, S, heads, hd, dtype)
        assert dts["token_major"].stride() == (heads * hd, 1) and dts["heads_major"].is_contiguous()
        cs_layouts = _cos_sin_layouts(g, B, S, hd, dtype)
        # Each dt layout with the stage's cos/sin, and each cos/sin layout with the stage's dt.
        cases = [(d, "expanded") for d in dts] + [("token_major", c) for c in cs_layouts if c != "expanded"]
        for dt_name, cs_name in cases:
            dt, (cos, sin) = dts[dt_name], cs_layouts[cs_name]
            flat_cos, flat_sin = cos.reshape(B * S, hd), sin.reshape(B * S, hd)
            for name, idx in _subsets(B * S, g).items():
                idx = _on_device(idx)
                got = rope_rows_backward(dt, cos, sin, idx)
                ref = rope_backward(dt, flat_cos, flat_sin, idx)
                assert got.dtype == dtype and got.shape == ref.shape and got.is_contiguous()
                assert torch.equal(got, ref), f"B={B} S={S} heads={heads} hd={hd} {dt_name} {cs_name} {name}"


@needs_kernel
def test_rope_kernel_refuses_what_it_does_not_compute():
    from cggr.kernels.rows import rope_rows_backward

    dt, cs = torch.zeros(4, 6, device=DEVICE), torch.zeros(4, 3, device=DEVICE)
    idx = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 3 must be even"):
        rope_rows_backward(dt, cs, cs, idx)
    with pytest.raises(ValueError, match=r"B\*S = N = 4"):
        rope_rows_backward(dt[:, :4], cs[:3, :2], cs[:3, :2], idx)
    with pytest.raises(TypeError, match="fp32/bf16/fp16 only"):
        rope_rows_backward(dt[:, :4].double(), cs[:, :2].double(), cs[:, :2].double(), idx)


# --------------------------------------------------------------------------- SwiGLU backward

# (rows N, width F): F below one column block, and over one (256 a block, the last one partial); several row
# blocks (16 rows a block at F = 300).
SWIGLU_SHAPES = [(45, 37), (45, 300), (1, 5)]
_UNIT_ROUNDOFF = 2.0 ** -24  # fp32
_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at ``|x|`` (at least at its smallest normal)."""
    a = x.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - _MANTISSA[dtype])


def _swiglu_bound(dm, g, u, idx, refs, dtype):
    """Per-element bound of ``|kernel - reference|`` for ``(m, dg, du)`` (the module docstring says why): three
    units of the dtype's last place, plus the sigmoids' difference ``|dsig| <= 8 * 2^-24`` times each result's
    sensitivity to it: ``|u g|`` (m = silu(g) u), ``|dm u| (1 + 3|g|)`` (dg) and ``|dm g|`` (du)."""
    gf, uf, dmf = rows_of(g, idx).double(), rows_of(u, idx).double(), dm.double()
    dsig = 8 * _UNIT_ROUNDOFF
    sens = ((uf * gf).abs(), (dmf * uf).abs() * (1 + 3 * gf.abs()), (dmf * gf).abs())
    return [3 * _ulp(r, dtype) + dsig * s for r, s in zip(refs, sens)]


def _swiglu_layouts(g, N, F, n, dtype):
    """``g``/``u`` ``[N, F]`` as saved (contiguous) and as strided views; ``dm`` ``[n, F]`` likewise."""
    plain = (_randn(g, N, F, dtype=dtype, scale=3.0), _randn(g, N, F, dtype=dtype), _randn(g, n, F, dtype=dtype))
    strided = (_randn(g, N, F + 3, dtype=dtype, scale=3.0)[:, :F], _randn(g, F, N, dtype=dtype).t(),
               _randn(g, F, n, dtype=dtype).t())
    return {"contiguous": plain, "strided": strided}


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_swiglu_kernel_is_the_reference(seed, dtype):
    from cggr.kernels.rows import swiglu_rows_backward

    exact = total = 0
    for N, F in SWIGLU_SHAPES:
        gen = _gen(seed, "swiglu", N, F, dtype)
        for name, idx in _subsets(N, gen).items():
            idx = _on_device(idx)
            for layout, (g, u, dm) in _swiglu_layouts(gen, N, F, N if idx is None else idx.numel(), dtype).items():
                got = swiglu_rows_backward(dm, g, u, idx)
                ref = swiglu_backward(dm, g, u, idx)
                bounds = _swiglu_bound(dm, g, u, idx, ref, dtype)
                for what, a, r, bound in zip(("m", "dg", "du"), got, ref, bounds):
                    where = f"{what} N={N} F={F} {name} {layout}"
                    assert a.dtype == dtype and a.shape == r.shape and a.is_contiguous(), where
                    err = (a.double() - r.double()).abs()
                    assert bool((err <= bound).all()), f"{where}: error {float((err / bound).max()):.3g} x bound"
                    exact += int((a == r).sum())
                    total += r.numel()
    # Exact where the two sigmoids agree: most elements (measured: about 96% in fp32, all but 1 in 10^5 in
    # bf16 and fp16). An FMA or a wrong order of operations would be off in many more fp32 elements.
    assert exact >= (0.9 if dtype == torch.float32 else 0.999) * total, f"{exact} of {total} exact"


@needs_kernel
def test_swiglu_kernel_refuses_what_it_does_not_compute():
    from cggr.kernels.rows import swiglu_rows_backward

    g = torch.zeros(4, 5, device=DEVICE)
    idx = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="3 rows"):
        swiglu_rows_backward(torch.zeros(2, 5, device=DEVICE), g, g, idx)
    with pytest.raises(TypeError, match="fp32/bf16/fp16 only"):
        swiglu_rows_backward(torch.zeros(3, 5, device=DEVICE).double(), g.double(), g.double(), idx)


_PTX_CHECK = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cggr.kernels import rows

def ptx(fn, sig, constexprs, fusion=False):
    # Launch-time specialisation: pointers, strides and sizes divisible by 16 (as the 350M's are), unit strides.
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t in ("*bf16", "*i64", "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = dict(rows._launch_opts(8192), enable_fp_fusion=fusion)  # fusion: as Inductor builds user kernels
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

p, i, c = "*bf16", "i32", "constexpr"
rope, rope_fused = (
    ptx(rows._rope_rows_backward_kernel,
        dict(dt_ptr=p, cos_ptr=p, sin_ptr=p, idx_ptr="*i64", out_ptr=p, n=i, S=i, heads=i, s_dr=i, s_dc=c, s_cb=c,
             s_cs=i, s_cd=c, s_sb=c, s_ss=i, s_sd=c, HALF=c, BLOCK_R=c, BLOCK_H=c, BLOCK_D=c, PRECISE=c, HAS_IDX=c),
        dict(s_dc=1, s_cb=0, s_cd=1, s_sb=0, s_sd=1, HALF=32, BLOCK_R=8, BLOCK_H=16, BLOCK_D=32, PRECISE=True,
             HAS_IDX=True), fusion)
    for fusion in (False, True))
swiglu, swiglu_fused = (
    ptx(rows._swiglu_rows_backward_kernel,
        dict(dm_ptr=p, g_ptr=p, u_ptr=p, idx_ptr="*i64", m_ptr=p, dg_ptr=p, du_ptr=p, n=i, F=i, s_mr=i, s_mc=c,
             s_gr=i, s_gc=c, s_ur=i, s_uc=c, PRECISE=c, BLOCK_R=c, BLOCK_F=c, HAS_IDX=c),
        dict(s_mc=1, s_gc=1, s_uc=1, PRECISE=True, BLOCK_R=16, BLOCK_F=256, HAS_IDX=True), fusion)
    for fusion in (False, True))
count = lambda text, *ops: sum(text.count(op) for op in ops)
print(json.dumps({name: dict(fma=count(t, "fma."), approx_div=count(t, "div.full", "div.approx"), ex2=count(t, "ex2."),
                             rn_bf16=count(t, "cvt.rn.bf16"), rz_bf16=count(t, "cvt.rz.bf16"),
                             vector_loads=count(t, "ld.global.v"), vector_stores=count(t, "st.global.v"))
                  for name, t in (("rope", rope), ("rope_fused", rope_fused), ("swiglu", swiglu),
                                  ("swiglu_fused", swiglu_fused))}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_the_gpu_as_intended():
    """The compiled (not interpreted) kernels, built for an sm_90 GPU without one (Triton's own compiler, in a
    process without TRITON_INTERPRET), with floating-point contraction off and on (Inductor, which launches them
    from the compiled stages, builds them with it on): the rotary backward has no FMA either way; the SwiGLU
    backward's FMAs are those inside libdevice's expf (the same number per exp2, and the same either way: its
    products are ``mul.rn``, which no contraction fuses), and its division is IEEE (no approximate one); both
    read and write bf16 rows with 16-byte vector accesses and round to bf16 by the hardware's
    round-to-nearest-even conversion (the interpreter's path rounds by bits)."""
    import json

    run_env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True, timeout=300, env=run_env,
                       cwd=ROOT)
    if r.returncode != 0 and ("ptxas" in r.stderr or "No module named 'triton.backends.nvidia'" in r.stderr):
        pytest.skip("this Triton cannot build for CUDA here: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rope"]["fma"] == got["rope_fused"]["fma"] == 0, got
    assert got["rope"]["vector_loads"] > 0 and got["rope"]["vector_stores"] > 0
    for name in ("rope", "swiglu"):  # bf16 results by the hardware's round-to-nearest-even conversion
        assert got[name]["rn_bf16"] > 0 and got[name]["rz_bf16"] == 0, got[name]
    sw = got["swiglu"]
    assert sw["ex2"] > 0 and sw["fma"] % sw["ex2"] == 0 and sw["fma"] == got["swiglu_fused"]["fma"], got
    assert sw["approx_div"] == 0, sw
    assert sw["vector_loads"] > 0 and sw["vector_stores"] > 0


# --------------------------------------------------------------------------- custom ops

def _op_inputs(seed, B, S, heads, hd, F, n, dtype=torch.float32):
    g = _gen(seed, "op", B, S, n)
    N = B * S
    dq = token_rows(torch.randn(B, S, heads, hd, generator=g).to(dtype).transpose(1, 2))
    cos = torch.randn(1, S, hd, generator=g).to(dtype).expand(B, S, hd)
    sin = torch.randn(1, S, hd, generator=g).to(dtype).expand(B, S, hd)
    gate, up = torch.randn(N, F, generator=g).to(dtype) * 3, torch.randn(N, F, generator=g).to(dtype)
    dm = torch.randn(n, F, generator=g).to(dtype)
    idx = torch.randperm(N, generator=g)[:n].clone() if n < N else torch.arange(N)  # no view: one guard set
    return dq, cos, sin, dm, gate, up, idx


def _stage(dq, cos, sin, dm, gate, up, idx, w):
    """A stage like ``qkv_backward_rows``/``mlp_backward_rows``: the ops between other work."""
    dq_a = pointwise.rope_rows_backward(dq, cos, sin, idx)
    m, dg, du = pointwise.swiglu_rows_backward(dm, gate, up, idx)
    return dq_a @ w, m * 2.0, dg + du


@pytest.mark.parametrize("seed", [0], ids=_seed_id)
def test_custom_ops_under_dynamic_compile_equal_eager(seed):
    """The ops inside ``torch.compile(dynamic=True)`` (Inductor calls them as extern kernels; off CUDA they run
    the reference): the eager results, for three row counts with one compilation (the row count is dynamic).

    Within fp32 rounding, not bit for bit: Inductor's CPU code for the work around the ops (the matmul, the
    fused adds) may vectorise, reorder and contract differently from eager, depending on the machine's
    instructions. Bit-equality is asserted where the instructions are fixed: the ops' own eager results
    below and the kernels under the interpreter (``test_rope_kernel_is_the_reference``,
    ``test_swiglu_kernel_is_the_reference``)."""
    import torch._dynamo.testing

    close = dict(rtol=1e-5, atol=1e-5)  # fp32: a few ulps of reassociation over sums of ~12 terms

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(_stage, backend=counter, dynamic=True, fullgraph=True)
    B, S, heads, hd, F = 2, 5, 3, 4, 11  # sizes distinct from the row counts (no duck-sized guards)
    w = torch.randn(heads * hd, 3, generator=_gen(seed, "w"))
    for n in (7, 4, B * S):
        args = _op_inputs(seed, B, S, heads, hd, F, n)
        eager = _stage(*args, w)
        got = compiled(*args, w)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, **close, msg=lambda m: f"{n} rows: {m}")
    assert counter.frame_count == 1
    # idx None (every row, in order, no index read): the values of the listed rows, eager and compiled.
    args = _op_inputs(seed, B, S, heads, hd, F, B * S)
    listed = _stage(*args, w)
    every = (*args[:-1], None)
    for a, b in zip(_stage(*every, w), listed):
        assert a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(compiled(*every, w), listed):
        torch.testing.assert_close(a, b, **close)
    # The eager ops are the references.
    dq, cos, sin, dm, gate, up, idx = _op_inputs(seed, B, S, heads, hd, F, 6)
    assert torch.equal(pointwise.rope_rows_backward(dq, cos, sin, idx),
                       rope_backward(dq, cos.reshape(-1, hd), sin.reshape(-1, hd), idx))
    for a, b in zip(pointwise.swiglu_rows_backward(dm, gate, up, idx), swiglu_backward(dm, gate, up, idx)):
        assert torch.equal(a, b)


@needs_kernel
def test_cuda_implementation_launches_the_kernels_else_the_reference(monkeypatch):
    """The ops' CUDA implementations (called directly, on the interpreter's CPU tensors): the kernels when Triton
    is available and the dtypes are theirs, else the references (CGGR_DISABLE_TRITON=1; fp64)."""
    from cggr.kernels import rows

    calls = []
    for name in ("rope_rows_backward", "swiglu_rows_backward"):
        real = getattr(rows, name)
        monkeypatch.setattr(rows, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    dq, cos, sin, dm, gate, up, idx = _op_inputs(3, 2, 5, 2, 6, 9, 6, torch.bfloat16)
    dq, cos, sin, dm, gate, up, idx = (t.to(DEVICE) for t in (dq, cos, sin, dm, gate, up, idx))
    flat = cos.reshape(-1, 6), sin.reshape(-1, 6)
    assert torch.equal(pointwise._rope_rows_cuda(dq, cos, sin, idx), rope_backward(dq, *flat, idx))
    for a, b in zip(pointwise._swiglu_rows_cuda(dm, gate, up, idx), swiglu_backward(dm, gate, up, idx)):
        assert torch.equal(a, b)
    every = torch.arange(dq.shape[0], device=DEVICE)  # idx None: every row, the kernels reading no index
    assert torch.equal(pointwise._rope_rows_cuda(dq, cos, sin, None), rope_backward(dq, *flat, every))
    for a, b in zip(pointwise._swiglu_rows_cuda(dm[:0].new_ones(gate.shape), gate, up, None),
                    swiglu_backward(dm[:0].new_ones(gate.shape), gate, up, every)):
        assert torch.equal(a, b)
    assert calls == ["rope_rows_backward", "swiglu_rows_backward"] * 2
    calls.clear()
    pointwise._rope_rows_cuda(dq.double(), cos.double(), sin.double(), idx)
    pointwise._swiglu_rows_cuda(dm.double(), gate.double(), up.double(), idx)
    monkeypatch.setenv("CGGR_DISABLE_TRITON", "1")
    pointwise._rope_rows_cuda(dq, cos, sin, idx)
    pointwise._swiglu_rows_cuda(dm, gate, up, idx)
    assert calls == []


# --------------------------------------------------------------------------- the CGGR_ROW_KERNELS switch

def test_switch_values(monkeypatch):
    monkeypatch.delenv("CGGR_ROW_KERNELS", raising=False)
    assert env.row_kernels() == "triton"  # the default
    for value in ("", "triton"):
        monkeypatch.setenv("CGGR_ROW_KERNELS", value)
        assert env.row_kernels() == "triton"
    monkeypatch.setenv("CGGR_ROW_KERNELS", "inductor")
    assert env.row_kernels() == "inductor"
    monkeypatch.setenv("CGGR_ROW_KERNELS", "triton")
    assert not pointwise.triton_rows(torch.zeros(1))  # off CUDA the PyTorch pieces run


def test_bad_switch_value_names_the_variable_and_the_allowed_values(monkeypatch):
    monkeypatch.setenv("CGGR_ROW_KERNELS", "Triton")
    message = r"CGGR_ROW_KERNELS='Triton': allowed values are inductor, triton"
    with pytest.raises(ValueError, match=message):
        env.row_kernels()
    dq, cos, sin, dm, gate, up, idx = _op_inputs(0, 1, 4, 1, 2, 3, 2)
    for activation in ("silu", "gelu_tanh"):  # on the CPU too, where the switch changes nothing
        with pytest.raises(ValueError, match=message):
            pointwise.glu_rows(dm, gate, up, idx, activation)
    with pytest.raises(ValueError, match=message):
        pointwise.rope_rows(dq, cos, sin, idx)
    # On CUDA the compiled stages read it while they compile; kernel() reads it first, where the error is plain.
    with pytest.raises(ValueError, match=message):
        pointwise.kernel(pointwise.glu_rows, on_cuda=True)
    monkeypatch.setenv("CGGR_COMPILE", "0")  # nothing compiled, nothing read
    assert pointwise.kernel(pointwise.glu_rows, on_cuda=True) is pointwise.glu_rows


def _rows_inputs(seed):
    B, S, heads, hd, F, n = 2, 5, 3, 4, 7, 6
    dq, cos, sin, dm, gate, up, idx = _op_inputs(seed, B, S, heads, hd, F, n)
    dk = token_rows(torch.randn(B, S, 1, hd, generator=_gen(seed, "rows")).transpose(1, 2))
    return (dq, dk, cos, sin, idx), (dm, gate, up, idx)


@pytest.mark.parametrize("setting", ["inductor", "triton"])
def test_stage_pieces_off_cuda_are_the_plain_ones(monkeypatch, setting):
    """Off CUDA the switch changes nothing: ``rope_rows`` (cos/sin ``[B, S, hd]`` as the stage passes them, or
    ``[N, hd]``) and ``glu_rows`` (SwiGLU and GeGLU) give the plain pieces' results and call no custom op."""
    monkeypatch.setenv("CGGR_ROW_KERNELS", setting)
    for name in ("rope_rows_backward", "swiglu_rows_backward"):
        monkeypatch.setattr(pointwise, name, lambda *a, _name=name: pytest.fail(f"{_name} called off CUDA"))
    (dq, dk, cos, sin, idx), (dm, gate, up, idx2) = _rows_inputs(0)
    flat = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    for cs in ((cos, sin), flat):
        for t in (dq, dk):
            assert torch.equal(pointwise.rope_rows(t, *cs, idx), rope_backward(t, *flat, idx))
    for activation in ("silu", "gelu_tanh"):
        want = pointwise.glu_backward(dm, gate, up, idx2, activation)
        for a, b in zip(pointwise.glu_rows(dm, gate, up, idx2, activation), want):
            assert torch.equal(a, b)


def test_stage_pieces_call_the_ops_when_the_switch_picks_them(monkeypatch):
    """Where ``triton_rows`` says so (CGGR_ROW_KERNELS=triton on CUDA; forced here), ``rope_rows`` hands the op
    cos/sin as the stage got them (no flattening copy) and ``glu_rows`` calls the SwiGLU op (GeGLU, which has no
    kernel, the plain piece); same results."""
    (dq, dk, cos, sin, idx), (dm, gate, up, idx2) = _rows_inputs(1)
    plain_rope = [pointwise.rope_rows(t, cos, sin, idx) for t in (dq, dk)]
    plain_glu = {a: pointwise.glu_rows(dm, gate, up, idx2, a) for a in ("silu", "gelu_tanh")}
    calls = []
    for name in ("rope_rows_backward", "swiglu_rows_backward"):
        real = getattr(pointwise, name)
        monkeypatch.setattr(pointwise, name,
                            lambda *a, _real=real, _name=name: calls.append((_name, a[1].dim())) or _real(*a))
    monkeypatch.setattr(pointwise, "triton_rows", lambda t: True)
    for t, want in zip((dq, dk), plain_rope):
        assert torch.equal(pointwise.rope_rows(t, cos, sin, idx), want)
    for activation, want in plain_glu.items():
        for a, b in zip(pointwise.glu_rows(dm, gate, up, idx2, activation), want):
            assert torch.equal(a, b)
    assert calls == [("rope_rows_backward", 3), ("rope_rows_backward", 3), ("swiglu_rows_backward", 2)]


# --------------------------------------------------------------------------- the GPU micro-benchmark

@needs_kernel
def test_benchmark_cpu_smoke(tmp_path):
    """benchmarks/rows.py end to end on tiny shapes on the CPU (Triton's interpreter), so that it does not rot:
    both stages, both active fractions, the Triton results equal to the references, the JSON written."""
    import json

    run_env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.rows", "--device", "cpu", "--smoke",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=run_env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.load(open(tmp_path / "rows-cpu.json"))
    assert [(x["stage"], x["fraction"]) for x in records] == [
        ("rope_backward", 0.59), ("rope_backward", 1.0), ("swiglu_backward", 0.59), ("swiglu_backward", 1.0)]
    for x in records:
        assert x["triton_ms"] > 0 and x["inductor_ms"] > 0 and x["bound_ms"] > 0
        assert x["triton_max_abs_diff"] is not None and x["triton_max_abs_diff"] <= x["tolerance"]
        for key in ("gpu", "torch", "triton", "git_rev", "command"):
            assert key in x
    assert r.stdout.splitlines()[-1].startswith("| tiny | swiglu_backward | 1.0 |")


def test_backward_stages_compile_with_only_the_row_count_dynamic():
    """``row_count_dynamic``, as ``kernel(..., rows="idx")`` passes a backward stage its arguments: one graph
    for every row count (three here), in which the row count is symbolic and every other size is a number (the
    model's hidden sizes, for which Inductor builds its best kernels): a weight's dim 0 stays static even when
    it equals the row count, and so do the ``[N, D]`` tensors."""
    import torch._dynamo.testing
    from cggr.compact.pointwise import row_count_dynamic

    def stage(x, idx, dh, w, w_n):
        return (rows_of(x, idx) + dh) @ w * w_n, dh.sum(0)

    seen = []

    def backend(gm, example_inputs):
        seen.append([tuple(n.meta["example_value"].shape) for n in gm.graph.nodes
                     if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)])
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(stage, backend=backend)
    g = _gen(5, "dynamic rows")
    N, D = 13, 7
    w = torch.randn(D, 5, generator=g).requires_grad_()  # dim 0 = 7 = one of the row counts below
    w_n = torch.randn(5, generator=g).requires_grad_()
    x = torch.randn(N, D, generator=g)
    for n in (4, 7, 11):
        idx = torch.randperm(N, generator=g)[:n]
        dh = torch.randn(n, D, generator=g)
        args = row_count_dynamic((x, idx, dh, w, w_n), 1)
        assert all(not a.requires_grad for a in args)
        got = compiled(*args)
        want = stage(x, idx, dh, w.detach(), w_n.detach())
        assert all(torch.equal(a, b) for a, b in zip(got, want)), n
    assert len(seen) == 1, seen  # one graph
    shapes = seen[0]
    is_int = lambda d: isinstance(d, int)  # a symbolic size is a torch.SymInt
    static = [s for s in shapes if all(map(is_int, s))]
    dynamic = [s for s in shapes if not all(map(is_int, s))]
    assert sorted(static) == sorted([(N, D), (D, 5), (5,)]), shapes  # x, w, w_n: numbers
    assert len(dynamic) == 2 and all(not is_int(s[0]) and all(map(is_int, s[1:])) for s in dynamic), shapes
    # idx None (every row): nothing is marked, the stage compiles for its shapes.
    plain = row_count_dynamic((x, None, x, w, w_n), 1)
    assert not any(hasattr(a, "_dynamo_weak_dynamic_indices") for a in plain if isinstance(a, torch.Tensor))
