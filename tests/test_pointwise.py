"""The row-wise pieces of the compacted backward (:mod:`cggr.compact.pointwise`) against autograd.

Each hand-written piece reads rows ``idx`` of full saved tensors and returns a
forward recompute or a backward of those rows. Every test runs the plain
forward the piece stands for (the RMSNorm of HF's ``LlamaRMSNorm``, HF's
``apply_rotary_pos_emb``, ``F.silu(g) * u``, ``F.gelu(approximate="tanh")``,
``F.layer_norm``) on the full tensors, upcast to fp64, lets ``torch.autograd``
differentiate it, and compares rows ``idx`` with the piece's output in each
dtype the piece may see: for every row count of a small odd set, a random
subset of rows in random order (as the routing hands them: deepest first), no
row, and every row in order.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cggr.compact.pointwise import (
    RMSNormKind, gelu_tanh_rows, glu_backward, glu_rows, kernel, layer_norm_backward_add, layer_norm_rows,
    rms_backward_add, rms_norm, rms_rows, rope_backward, rope_rows, swiglu_backward, token_rows)

SEEDS = [0, 1, 2]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 3, 7, 13]
HIDDEN = [1, 5, 17, 33]
EPS = 1e-5

# Tolerance per dtype, as a multiple of |ref| + scale (scale: the largest |ref| of the tensor by default; where
# a result comes out of a cancellation or a sum over rows, the magnitude of the terms, said at each check). The
# reference is autograd of the plain forward in fp64 on the same (dtype-rounded) inputs: the exact value. The
# pieces compute in fp32 (fp64 for fp64 inputs) and round their result once to the dtype, and round silu(g) and
# the normalised rows to the dtype where the layer's forward does, so they are off by about one rounding of the
# dtype (bf16: 2^-9, fp16: 2^-12 relative; fp16 results below 2^-14 are subnormal and coarser) plus fp32's (or
# fp64's) own rounding through the GELU's and the norms' conditioning. Largest error measured over every test
# here with seeds 0-19: fp64 23 x 2^-52, fp32 4.6 x 2^-23, bf16 0.88 x 2^-8, fp16 1.74 x 2^-11. Each tolerance
# is about four times that.
TOL = {torch.float64: 2e-14, torch.float32: 2.5e-6, torch.bfloat16: 4 * 2**-8, torch.float16: 8 * 2**-11}


def _seed_id(s):
    return f"seed={s}"


def _gen(seed, *key) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(repr(key).encode()))


def _randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _subsets(n: int, g: torch.Generator):
    """Row subsets a routing hands a block: some rows deepest first (not sorted), none, all in order."""
    some = torch.randperm(n, generator=g)[:max(1, (n + 1) // 2)]
    return {"some": some, "none": torch.zeros(0, dtype=torch.long), "all": torch.arange(n)}


WORST: dict = {}  # largest err / (|ref| + scale) seen per dtype: how TOL's comment was measured


def _close(got, ref, dtype, what, scale=None):
    """``|got - ref| <= TOL[dtype] * (|ref| + scale)`` elementwise; ``ref`` is fp64."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if scale is None:
        scale = ref.abs().max() if ref.numel() else torch.zeros((), dtype=torch.float64)
    err = (got.double() - ref).abs()
    bound = ref.abs() + scale
    ratio = float((err / bound.clamp_min(1e-300)).max()) if err.numel() else 0.0
    WORST[dtype] = max(WORST.get(dtype, 0.0), ratio)
    assert ratio <= TOL[dtype], f"{what}: error {ratio:.3g} x (|ref| + scale), allowed {TOL[dtype]:.3g}"


def _exact(*ts):
    """fp64 leaves of the same values: the reference differentiates these."""
    return [t.detach().double().requires_grad_() for t in ts]


def _grads(out, inputs, grad_out):
    """autograd's gradient of ``(out * grad_out).sum()`` for each of ``inputs``; zeros where there is none."""
    gs = torch.autograd.grad(out, inputs, grad_out.double(), allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


# The RMSNorms the compacted blocks stand for: HF's LlamaRMSNorm (w * x_hat.to(dtype)), Olmo2RMSNorm
# ((w * x_hat).to(dtype)) and Gemma3RMSNorm (((1 + w) * x_hat).to(dtype)); they differ in where bf16 rounds.
NORMS = {"llama": RMSNormKind(), "olmo2": RMSNormKind(weight_in_fp32=True),
         "gemma": RMSNormKind(offset=1.0, weight_in_fp32=True)}


def _rms_norm(x, w, kind=NORMS["llama"]):
    """The RMSNorm of ``kind`` in x's precision (fp64 here: where it rounds does not matter)."""
    return (kind.offset + w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _rstd(x):
    """The saved statistic: rsqrt(mean(x^2) + eps) in fp32 (fp64 for fp64 inputs)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)


def _ln_stats(x):
    """LayerNorm's saved statistics in fp32 (fp64 for fp64 inputs)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf.mean(-1, keepdim=True), torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + EPS)


# --------------------------------------------------------------------------- references (fp64 autograd)

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def _ref_swiglu(dm, g, u, idx, activation="silu"):
    g, u = _exact(g, u)
    m = ACTIVATIONS[activation](g) * u
    dg, du = _grads(m[idx], (g, u), dm)
    return m[idx].detach(), dg[idx], du[idx]


def _ref_rms_rows(x, w, idx, kind=NORMS["llama"]):
    return _rms_norm(*_exact(x, w), kind)[idx].detach()


def _ref_rope(dt_heads, cos, sin, bi, si):
    cos, sin = cos.double(), sin.double()
    t = torch.zeros_like(dt_heads, dtype=torch.float64, requires_grad=True)
    out, _ = apply_rotary_pos_emb(t, t, cos, sin)  # HF's rotary; rotates q and k alike, one of them is enough
    (dt,) = _grads(out, (t,), dt_heads)
    return dt[bi, :, si].reshape(bi.numel(), dt.shape[1] * dt.shape[3])


def _ref_head_rows(t_heads, idx):
    B, heads, S, hd = t_heads.shape
    return t_heads.transpose(1, 2).reshape(B * S, heads * hd)[idx]


# --------------------------------------------------------------------------- SwiGLU and RMSNorm (Llama)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_swiglu_backward(seed, dtype):
    for n in ROWS:
        for H in HIDDEN:
            gen = _gen(seed, "swiglu", n, H)
            g, u = _randn(gen, n, H, dtype=dtype, scale=3.0), _randn(gen, n, H, dtype=dtype)
            for name, idx in _subsets(n, gen).items():
                dm = _randn(gen, idx.numel(), H, dtype=dtype)
                got = swiglu_backward(dm, g, u, idx)
                for what, a, b in zip(("m", "dg", "du"), got, _ref_swiglu(dm, g, u, idx)):
                    assert a.dtype == dtype
                    _close(a, b, dtype, f"{what} rows={n} H={H} {name}")


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_rms_norm_and_rows(seed, dtype, norm):
    """The forward (output and the saved statistic) and its recompute on rows from the statistic."""
    kind = NORMS[norm]
    for n in ROWS:
        for H in HIDDEN:
            gen = _gen(seed, "rms_rows", n, H)
            x, w = _randn(gen, n, H, dtype=dtype, scale=2.0), _randn(gen, H, dtype=dtype)
            out, rstd = rms_norm(x, w, EPS, kind)
            assert out.dtype == dtype and rstd.dtype == torch.float32
            # HF's RMSNorms normalise in fp32 whatever the input's dtype (fp64 too), and so does rms_norm.
            _close(out, _ref_rms_rows(x, w, torch.arange(n), kind), torch.float32 if dtype == torch.float64 else dtype,
                   f"forward rows={n} H={H}")
            for name, idx in _subsets(n, gen).items():
                got = rms_rows(x, _rstd(x), w, idx, kind)
                assert got.dtype == dtype
                _close(got, _ref_rms_rows(x, w, idx, kind), dtype, f"rows={n} H={H} {name}")


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_rms_backward_add(seed, dtype, norm):
    kind = NORMS[norm]
    for n in ROWS:
        for H in HIDDEN:
            gen = _gen(seed, "rms_backward", n, H)
            x, w = _randn(gen, n, H, dtype=dtype, scale=2.0), _randn(gen, H, dtype=dtype)
            for name, idx in _subsets(n, gen).items():
                dout = _randn(gen, idx.numel(), H, dtype=dtype)
                residual = _randn(gen, idx.numel(), H, dtype=dtype)
                dx_a, dw = rms_backward_add(dout, residual, x, _rstd(x), w, idx, kind)
                xe, we = _exact(x, w)
                ref_dx, ref_dw = _grads(_rms_norm(xe, we, kind)[idx], (xe, we), dout)
                assert dx_a.dtype == dtype and dw.dtype == torch.promote_types(dtype, torch.float32)
                rstd = torch.rsqrt(xe.detach().pow(2).mean(-1, keepdim=True) + EPS)[idx]
                # dx = rstd (dxhat - xhat mean(dxhat xhat)) cancels: its error scales with the row's rstd |dout w|.
                _close(dx_a, residual.double() + ref_dx[idx], dtype, f"dx rows={n} H={H} {name}",
                       scale=rstd * (dout.double() * (kind.offset + w.double())).abs().amax(-1, keepdim=True))
                # dw sums over the rows: its error scales with the terms' magnitudes |dout * x_hat|.
                xhat = xe.detach()[idx] * rstd
                _close(dw, ref_dw, dtype, f"dw rows={n} H={H} {name}", scale=(dout.double() * xhat).abs().sum(0))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_glu_backward(seed, dtype, activation):
    """The gated MLP's backward, SwiGLU and GeGLU (tanh-GELU gate), as the stage calls it (``glu_rows``: off
    CUDA the plain piece)."""
    for n in ROWS:
        for H in HIDDEN:
            gen = _gen(seed, "glu", activation, n, H)
            g, u = _randn(gen, n, H, dtype=dtype, scale=3.0), _randn(gen, n, H, dtype=dtype)
            for name, idx in _subsets(n, gen).items():
                dm = _randn(gen, idx.numel(), H, dtype=dtype)
                got = glu_backward(dm, g, u, idx, activation)
                for a, b in zip(glu_rows(dm, g, u, idx, activation), got):
                    assert torch.equal(a, b)
                # tanh-GELU cancels for negative g (as in test_gelu_tanh_rows): its errors scale with |g| + 1 times
                # the factors each result has (m = act u, dg = dm u act', du = dm act).
                ga, ua, dma = g[idx].double().abs() + 1, u[idx].double().abs(), dm.double().abs()
                scales = {"m": ga * ua, "dg": ga * dma * ua, "du": ga * dma} if activation == "gelu_tanh" else {}
                for what, a, b in zip(("m", "dg", "du"), got, _ref_swiglu(dm, g, u, idx, activation)):
                    assert a.dtype == dtype
                    _close(a, b, dtype, f"{what} rows={n} H={H} {name}", scale=scales.get(what))


# --------------------------------------------------------------------------- rotary and head rows

def _rope_inputs(gen, B, S, heads, hd, dtype):
    dt_heads = _randn(gen, B, heads, S, hd, dtype=dtype)
    # Like the Llama path: one [1, S, hd] table expanded over the batch (stride 0), values of a rotary table's range.
    cos = (torch.rand(1, S, hd, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype).expand(B, S, hd)
    sin = (torch.rand(1, S, hd, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype).expand(B, S, hd)
    return dt_heads, cos, sin


BSH = [(1, 1, 1, 2), (1, 3, 3, 6), (2, 7, 1, 10), (3, 5, 3, 4)]  # (batch, seq, heads, head_dim): head_dim is even


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_rope_backward(seed, dtype):
    for B, S, heads, hd in BSH:
        gen = _gen(seed, "rope", B, S, heads, hd)
        dt_heads, cos, sin = _rope_inputs(gen, B, S, heads, hd, dtype)
        for name, idx in _subsets(B * S, gen).items():
            bi, si = idx // S, idx % S
            got = rope_backward(token_rows(dt_heads), cos.reshape(B * S, hd), sin.reshape(B * S, hd), idx)
            assert got.dtype == dtype
            _close(got, _ref_rope(dt_heads, cos, sin, bi, si), dtype, f"B={B} S={S} heads={heads} hd={hd} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_token_rows(seed, dtype):
    """One row per token: a view of token-major storage (what the blocks and the fused attention keep), a copy
    of heads-major storage; the same values either way."""
    for B, S, heads, hd in BSH + [(2, 3, 5, 3)]:
        gen = _gen(seed, "token_rows", B, S, heads, hd)
        token_major = _randn(gen, B, S, heads, hd, dtype=dtype).transpose(1, 2)
        heads_major = token_major.contiguous()
        for t in (token_major, heads_major):
            got = token_rows(t)
            assert got.shape == (B * S, heads * hd)
            for name, idx in _subsets(B * S, gen).items():
                assert torch.equal(got[idx], _ref_head_rows(t, idx)), f"B={B} S={S} heads={heads} hd={hd} {name}"
        assert token_rows(token_major).data_ptr() == token_major.data_ptr()  # no copy
        if heads > 1 and S > 1:
            assert token_rows(heads_major).data_ptr() != heads_major.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_rope_rows(seed, dtype):
    """The rotary backward as the stage calls it (``rope_rows``): cos/sin ``[B, S, hd]`` expanded over the batch,
    as the stage passes them, or ``[N, hd]``; grouped-query (fewer k heads) alike."""
    for B, S in [(1, 1), (2, 7), (3, 5)]:
        heads, kv, hd = 3, 1, 6
        gen = _gen(seed, "rope_rows", B, S)
        dq, cos, sin = _rope_inputs(gen, B, S, heads, hd, dtype)
        dk = _randn(gen, B, kv, S, hd, dtype=dtype)
        for name, idx in _subsets(B * S, gen).items():
            bi, si = idx // S, idx % S
            for cs in ((cos, sin), (cos.reshape(B * S, hd), sin.reshape(B * S, hd))):
                _close(rope_rows(token_rows(dq), *cs, idx), _ref_rope(dq, cos, sin, bi, si), dtype,
                       f"dq B={B} S={S} {name}")
                _close(rope_rows(token_rows(dk), *cs, idx), _ref_rope(dk, cos, sin, bi, si), dtype,
                       f"dk B={B} S={S} {name}")


# --------------------------------------------------------------------------- GELU and LayerNorm (GPT-2)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_gelu_tanh_rows(seed, dtype):
    for n in ROWS:
        for H in HIDDEN:
            gen = _gen(seed, "gelu", n, H)
            f = _randn(gen, n, H, dtype=dtype, scale=3.0)
            for name, idx in _subsets(n, gen).items():
                dact = _randn(gen, idx.numel(), H, dtype=dtype)
                act_a, df_a = gelu_tanh_rows(dact, f, idx)
                (fe,) = _exact(f)
                act = F.gelu(fe, approximate="tanh")  # the GPT-2 compacted forward's activation
                (df,) = _grads(act[idx], (fe,), dact)
                assert act_a.dtype == dtype and df_a.dtype == dtype
                # 0.5 f (1 + tanh(...)) cancels for negative f: the error scales with |f| (and |dact|), not with
                # the tiny result; PyTorch's own fp32 GELU computes the same formula.
                _close(act_a, act[idx].detach(), dtype, f"act rows={n} H={H} {name}", scale=f[idx].double().abs())
                _close(df_a, df[idx], dtype, f"df rows={n} H={H} {name}", scale=dact.double().abs())


# A LayerNorm over one element is its bias alone (x - mean(x) = 0): nothing to compare there.
LN_HIDDEN = [h for h in HIDDEN if h > 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_layer_norm_rows(seed, dtype):
    for n in ROWS:
        for H in LN_HIDDEN:
            gen = _gen(seed, "ln_rows", n, H)
            x = _randn(gen, n, H, dtype=dtype, scale=2.0) + 0.5
            w, b = _randn(gen, H, dtype=dtype), _randn(gen, H, dtype=dtype)
            mean, rstd = _ln_stats(x)
            for name, idx in _subsets(n, gen).items():
                got = layer_norm_rows(x, mean, rstd, w, b, idx)
                assert got.dtype == dtype
                xe, we, be = _exact(x, w, b)
                _close(got, F.layer_norm(xe, (H,), we, be, EPS)[idx].detach(), dtype, f"rows={n} H={H} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS, ids=_seed_id)
def test_layer_norm_backward_add(seed, dtype):
    for n in ROWS:
        for H in LN_HIDDEN:
            gen = _gen(seed, "ln_backward", n, H)
            x = _randn(gen, n, H, dtype=dtype, scale=2.0) + 0.5
            w, b = _randn(gen, H, dtype=dtype), _randn(gen, H, dtype=dtype)
            mean, rstd = _ln_stats(x)
            for name, idx in _subsets(n, gen).items():
                dout = _randn(gen, idx.numel(), H, dtype=dtype)
                residual = _randn(gen, idx.numel(), H, dtype=dtype)
                dx_a, dw, db = layer_norm_backward_add(dout, residual, x, mean, rstd, w, idx)
                xe, we, be = _exact(x, w, b)
                ref_dx, ref_dw, ref_db = _grads(F.layer_norm(xe, (H,), we, be, EPS)[idx], (xe, we, be), dout)
                assert dx_a.dtype == dtype and dw.dtype == db.dtype == torch.promote_types(dtype, torch.float32)
                # dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) cancels: its error scales with the row's
                # rstd |dout w|.
                _close(dx_a, residual.double() + ref_dx[idx], dtype, f"dx rows={n} H={H} {name}",
                       scale=rstd[idx].double() * (dout.double() * w.double()).abs().amax(-1, keepdim=True))
                # dw and db sum over the rows: their error scales with the terms' magnitudes, and x_hat's with the
                # size of x - mean before the subtraction: sum |dout| rstd (|x| + |mean|).
                terms = dout.double().abs() * rstd[idx].double() * (x[idx].double().abs() + mean[idx].double().abs())
                _close(dw, ref_dw, dtype, f"dw rows={n} H={H} {name}", scale=terms.sum(0))
                _close(db, ref_db, dtype, f"db rows={n} H={H} {name}", scale=dout.double().abs().sum(0))


# --------------------------------------------------------------------------- dispatch

def test_kernel_is_the_eager_function_off_cuda_or_with_compile_off(monkeypatch):
    assert kernel(swiglu_backward, on_cuda=False) is swiglu_backward
    monkeypatch.setenv("CGGR_COMPILE", "0")
    assert kernel(swiglu_backward, on_cuda=True) is swiglu_backward

