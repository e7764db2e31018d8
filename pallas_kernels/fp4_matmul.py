"""Kernel 2: block-scaled FP4 GEMM with the fused low-rank epilogue, and the public entry point.

    y = Q_a(x/s) · deq(W_res)ᵀ + ((x/s)·A)·Bᵀ (+ bias)
                             (docs/spec/kernels.md §1)

Kernel 2 has grid (Mp/bm, Np/bn) and a K loop inside the program (Triton: no scratch memory, the
accumulator is the ``fori_loop`` carry). Per K tile it loads the packed weight tile ``[bn, bk/2]``
and its scale bytes and decodes each byte's two nibbles and applies the block scale in one
inline-PTX op per nibble and four bytes (``codecs.e2m1_pair_bf16_scaled``: the Marlin decode into
bf16's exponent, then ``mul.rn.bf16x2``; nvfp4 as E2M1·S·2^-7, mxfp4 as E2M1·2^(b-127); exact, at
most 6 significant bits, and normal), then runs two bf16 tensor-core dots per activation part,
x_even·w_loᵀ + x_odd·w_hiᵀ (docs/spec/kernels.md §3, no interleave). The epilogue multiplies by the
tensor parts of the nvfp4 decodes (fl(1/gs_x)·fl(1/gs_w), or g_x·g_w for nvfp4-modelopt, times the
2^7 of the nvfp4 weights; applied to the f32 accumulator because they are not exact in bf16), adds
t·Bᵀ (t summed over kernel 1's K-slab partials) and the bias while the
tile is in registers, and stores the output once.

Both modes take their activation operand from kernel 1 in per-slab [even | odd] order, as bf16:
W4A4 the quantized values (code × block scale), W4A16 x/s as three bf16 parts whose f32 sum is x/s
exactly (three tensor-core dots per parity instead of an f32 FMA dot), or as one part when x is
bf16 without smoothing (exact) or ``a16_bf16=True`` (the fast mode that rounds x/s to bf16 like
``qlinear.quant_matmul_ref(..., a16_bf16=True)``). A call is kernel 1 + kernel 2 (plus XLA's
reduction for a dynamic nvfp4 activation scale, and a pad when K or N is not a tile multiple).

Backends: ``interpret=True`` anywhere (CPU tests); on GPU the generic ``pallas_call`` is lowered
by Triton (selected by ``compiler_params=pltriton.CompilerParams``, jax 0.9.1+;
docs/spec/kernels.md §7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

import pallas_kernels.codecs as codecs
from arhq_jax.numerics import formats
from arhq_jax.numerics.formats import smooth_input
from pallas_kernels.act_quant import act_prepare_call, expand_blocks

KERNEL_FORMATS = ("nvfp4", "mxfp4")  # by FormatSpec.name: both nvfp4 conventions
_NV_LABELS = ("nvfp4", "nvfp4-modelopt")
_K1_BM = 16  # kernel 1's row block: its work is per row, so small blocks give many programs
_K1_SPLIT_MAX_BLOCKS = 64  # with fewer row blocks than this, kernel 1 is parallel over K too


def _gemm_kernel(
    *refs,
    gx: str | None,
    gw: str | None,
    has_lr: bool,
    has_bias: bool,
    w_fmt: str,
    bk: int,
    interpret: bool,
    split: int,
):
    it = iter(refs)
    x_ref = next(it)
    c_ref = next(it)
    sc_ref = next(it)
    gx_ref = next(it) if gx else None
    gw_ref = next(it) if gw else None
    t_ref = next(it) if has_lr else None
    b_ref = next(it) if has_lr else None
    bias_ref = next(it) if has_bias else None
    o_ref = next(it)

    bm, bn = o_ref.shape[-2:]
    parts = x_ref.shape[0]
    h = bk // 2
    hb = 8 if w_fmt == "nvfp4" else 16  # bytes per scale block
    nb = h // hb
    nk = c_ref.shape[1] // h
    dims = (((1,), (1,)), ((), ()))

    def body(kt, acc):
        codes = c_ref[:, pl.ds(kt * h, h)]
        sb = sc_ref[:, pl.ds(kt * nb, nb)].astype(jnp.int32)
        if w_fmt == "nvfp4":
            # Decode and block scale in one PTX op per nibble, straight to bf16 (E2M1 · S · 2^-7,
            # exact and normal; codecs.e2m1_pair_bf16_scaled): no f32 conversions in the loop.
            sw = expand_blocks(codecs.e4m3_bf16_prescaled(sb), hb)
            w_lo, w_hi = codecs.e2m1_pair_bf16_scaled(codes, sw, interpret=interpret)
        else:
            # mxfp4: the same decode times two bf16 powers of two (codecs.e8m0_bf16_factors: one
            # cannot carry 2^(b - 127) over E8M0's range), E2M1 × 2^(b - 127) exactly.
            m1, m2 = codecs.e8m0_bf16_factors(sb)
            w_lo, w_hi = codecs.e2m1_pair_bf16_scaled(
                codes, expand_blocks(m1, hb), scale2=expand_blocks(m2, hb), interpret=interpret
            )
        k0 = kt * bk
        for p in range(parts):  # W4A16 f32 x/s: three bf16 parts whose sum is exact
            xe = x_ref[p, :, pl.ds(k0, h)]
            xo = x_ref[p, :, pl.ds(k0 + h, h)]
            acc = acc + jax.lax.dot_general(xe, w_lo, dims, preferred_element_type=jnp.float32)
            acc = acc + jax.lax.dot_general(xo, w_hi, dims, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    # The nvfp4 tensor parts of the decode, formed here from the raw scalars (so that no XLA
    # scalar kernel runs before the kernels): gx "amax-ct"/"amax-mo" (from max|x/s|), "ct"/"mo"
    # (a given activation tensor scale), gw "ct"/"mo" (the weight's tensor scale).
    g = None
    if gx:
        v = gx_ref[...]
        if gx.startswith("amax"):
            v = codecs.nvfp4_scale_from_amax(v, gx.endswith("ct"), interpret=interpret)
        g = codecs.nvfp4_decode(v, gx.endswith("ct"), interpret=interpret)
    if gw:
        dw = codecs.nvfp4_decode(gw_ref[...], gw == "ct", interpret=interpret)
        g = dw if g is None else g * dw
    if w_fmt == "nvfp4":  # the bf16 weights are value × 2^-7: 2^7 into g (exact, a power of 2)
        g = g * codecs.BF16_FOLD
    if g is not None:
        acc = acc * g
    # Split-K: this program's partial sum over one K slice; the low-rank term and the bias enter
    # the partial of slice 0 only (the partials are summed after the kernel).
    extra = jnp.zeros_like(acc)
    if has_lr:
        # The partial sums of a K-parallel kernel 1 (one per K slab: up to K/bk of them), summed
        # in a loop: unrolled, a long K (e.g. 112 slabs) would hold them all live and spill.
        nt = t_ref.shape[0]
        if nt <= 4:
            t = t_ref[0]
            for i in range(1, nt):
                t = t + t_ref[i]
        else:
            t = jax.lax.fori_loop(1, nt, lambda i, t: t + t_ref[i], t_ref[0])
        # t·Bᵀ on the tensor cores: t (f32) and B as bf16 parts (three, or B's own bf16), and
        # the products of parts i·j with i + j <= 2 (the dropped ones are < 2^-24 relative). An
        # f32 dot at HIGHEST would be FMA instructions (Triton's IEEE f32 dot), which spill.
        bv = b_ref[...]
        t_parts = codecs.bf16_parts(t, 3)
        b_parts = [bv] if bv.dtype == jnp.bfloat16 else codecs.bf16_parts(bv.astype(jnp.float32), 3)
        for i, tp in enumerate(t_parts):
            for j, bp in enumerate(b_parts):
                if i + j <= 2:
                    extra = extra + jax.lax.dot_general(
                        tp, bp, dims, preferred_element_type=jnp.float32
                    )
    if has_bias:
        extra = extra + bias_ref[...].astype(jnp.float32)
    if has_lr or has_bias:
        acc = acc + (extra if split == 1 else jnp.where(pl.program_id(2) == 0, extra, 0.0))
    o_ref[...] = acc.astype(o_ref.dtype)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad2(a: jax.Array, rows: int, cols: int, value=0) -> jax.Array:
    """Pad a 2-D array at the end to ``[rows, cols]``; a no-op (no copy) when already that size."""
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])), constant_values=value)


def choose_tiles(m: int, n: int, k_pad: int, block_m=None, block_n=None, block_k=None):
    """Default tiles (docs/spec/kernels.md §8), before any autotuning. Returns (bm, bn, bk, warps,
    stages).

    bm follows M (16 for decode: Triton's dot needs >= 16 rows). For M <= 64 the layer is memory
    bound and the grid has a single row of programs, so bn shrinks until there are about 256
    programs to spread the weight stream over the SMs; prefill uses 128 x 128 tiles. bn and bk
    prefer exact divisors of N and K so that no padding copy is needed.
    """
    bm = block_m or (16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128)
    if block_n:
        bn = block_n
    else:
        target = 128 if m > 64 else max(16, min(128, _pow2_floor(max(n // 256, 1))))
        cands = [c for c in (128, 64, 32, 16) if c <= target]
        bn = next((c for c in cands if n % c == 0), target)
    if block_k:
        bk = block_k
    else:
        order = (128, 256, 64)  # decode: 128 keeps kernel 1 (quantizer + x·A) out of spills
        bk = next((c for c in order if k_pad % c == 0), 128 if k_pad >= 128 else 64)
    # Decode tiles (bm = 16, bn <= 32) use one warp: with more, every warp decodes the same
    # weight tile (Triton splits the bm x bn MMA among the warps and replicates the B operand).
    num_warps = 8 if bm * bn >= 128 * 128 else 1 if bm * bn <= 16 * 32 else 4
    return bm, bn, bk, num_warps, 3


def kernel_tiles(
    m: int,
    n: int,
    k_pad: int,
    *,
    three_parts: bool,
    w_fmt: str,
    block_m=None,
    block_n=None,
    block_k=None,
    num_stages=None,
):
    """The tiles a call runs with (``choose_tiles`` and the W4A16 three-part adjustments): the
    same function for the kernel and for ``benchmarks/gpu_aot.py``'s model. Returns (bm, bn, bk,
    warps, stages). ``three_parts``: W4A16 with x/s as three bf16 operand parts."""
    bm, bn, bk, nw, ns = choose_tiles(m, n, k_pad, block_m, block_n, block_k)
    if three_parts and block_k is None:
        # Three bf16 operand tiles: smaller K tiles keep the pipelined tiles in shared memory
        # (prefill) and the decode warp's operands in registers (the mxfp4 decode holds two
        # multiplier tiles: at bn >= 32 a 128-wide K tile spills).
        cap = 64 if bm >= 64 or (w_fmt == "mxfp4" and bn >= 32) else 128
        if bk > cap and k_pad % cap == 0:
            bk = cap
    if three_parts and bm >= 64 and bk > 64 and num_stages is None:
        ns = min(ns, 2)  # an explicit large K tile: fewer pipeline stages fit in smem
    return bm, bn, bk, nw, ns


SMS = 132  # streaming multiprocessors of an H100 / H200 SXM
SPLIT_MIN_TILES = 4  # K tiles per split at least: the software pipeline needs a few to overlap


def choose_split(row_blocks: int, col_blocks: int, k_tiles: int) -> int:
    """Split-K factor for kernel 2: 1 when the (row, column) grid fills at least half the SMs (the
    f32 partials and XLA's sum of them, a third launch, would cost more than the idle SMs); else
    the smallest power of two that brings the programs to >= SMS, at most k_tiles /
    SPLIT_MIN_TILES and dividing k_tiles."""
    programs = row_blocks * col_blocks
    split = 1
    if 2 * programs >= SMS:
        return split
    while (
        programs * split < SMS
        and k_tiles % (2 * split) == 0
        and k_tiles // (2 * split) >= SPLIT_MIN_TILES
    ):
        split *= 2
    return split


def _pow2_floor(v: int) -> int:
    return 1 << (v.bit_length() - 1)


def _check_backend(interpret: bool) -> None:
    backend = jax.default_backend()
    if not interpret and backend != "gpu":
        raise ValueError(
            f"the Pallas FP4 kernels need a GPU (Triton backend); on {backend!r} pass "
            "interpret=True (or use the kernel='xla' path)"
        )


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
    """Triton is selected by its CompilerParams (jax >= 0.9.1: no ``backend=`` argument)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _kernel_spec(fmt, what: str):
    try:
        spec = formats.resolve_format(fmt)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if spec.name not in KERNEL_FORMATS:
        raise ValueError(
            f"{what} {spec.label!r} is not supported by the Pallas kernel "
            f"(supported: {', '.join(KERNEL_FORMATS)}); use the kernel='xla' path"
        )
    if spec.scale_rule != "floor":
        raise ValueError(f"{what}: the kernel quantizes mxfp4 with the floor rule only")
    return spec


def check_operands(x, w, a, b, smooth, bias):
    """Validate shapes for ``fp4_lowrank_matmul``; returns (N, K, r). Raises ValueError."""
    if not isinstance(w, formats.QTensor):
        raise ValueError(f"w must be a formats.QTensor, got {type(w).__name__}")
    _kernel_spec(w.spec, "weight format")
    if len(w.shape) != 2 or w.axis != 1:
        raise ValueError(
            f"w must be a 2-D weight [out, in] quantized along in (axis 1), got shape {w.shape} "
            f"axis {w.axis}"
        )
    n, k = w.shape
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} has last axis != in_features {k}")
    if (a is None) != (b is None):
        raise ValueError("give both low-rank factors a [in, r] and b [out, r], or neither")
    r = 0
    if a is not None:
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[0] != k
            or b.shape[0] != n
            or a.shape[1] != b.shape[1]
        ):
            raise ValueError(
                f"low-rank factor shapes a {tuple(a.shape)}, b {tuple(b.shape)} do not match "
                f"a [in={k}, r], b [out={n}, r]"
            )
        r = a.shape[1]
    if smooth is not None and tuple(smooth.shape) != (k,):
        raise ValueError(f"smooth must have shape ({k},), got {tuple(smooth.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return n, k, r


def fp4_lowrank_matmul(
    x: jax.Array,
    w: formats.QTensor,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    smooth: jax.Array | None = None,
    act_fmt=None,
    *,
    bias: jax.Array | None = None,
    act_tensor_scale=None,
    a16_bf16: bool = False,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_k: int | None = None,
) -> jax.Array:
    """y = Q_a(x/s)·deq(w)ᵀ + ((x/s)·a)·bᵀ (+ bias) with the two Pallas kernels.

    Equals ``qlinear.quant_matmul_ref`` with the same arguments up to the f32 summation order
    (docs/spec/kernels.md §1; x/s is computed as x·fl32(1/s) by both, see ``qlinear.smooth_input``).

    Args:
      x: ``[..., K]`` f32 or bf16 (any M, including 1).
      w: packed residual, a ``formats.QTensor`` of shape ``[N, K]`` in nvfp4 or mxfp4 (blocks
        along K).
      a, b: low-rank factors ``[K, r]`` and ``[N, r]`` (any float dtype, upcast to f32), or None
        (rank 0: the branch is removed statically).
      smooth: ``[K]`` divisor s, or None.
      act_fmt: "nvfp4" / "mxfp4" (W4A4) or None (W4A16).
      bias: ``[N]`` or None.
      act_tensor_scale: static nvfp4 activation tensor scale in the activation format's
        convention (gs_x = 2688/amax for "nvfp4", g_x = amax/2688 for "nvfp4-modelopt"); None
        computes it from max|x/s| (one small XLA reduction over x before kernel 1).
      a16_bf16: W4A16 fast mode: x/s rounded to bf16 before the MMA.
      interpret: run the kernels in Pallas interpret mode (CPU).
      block_m, block_n, block_k, num_warps, num_stages: tile overrides (powers of two; bk a
        multiple of 32; bm, bn >= 16 for Triton's dot). Defaults from ``choose_tiles``.
      split_k: K slices that kernel 2 reduces in parallel (a power of two dividing the number of
        K tiles; f32 partials summed by XLA: one more launch); None: ``choose_split``.
    Returns:
      y ``[..., N]`` in x's dtype (f32 accumulation throughout).
    Raises:
      ValueError: mismatched shapes, a format the kernel does not support, bad tiles, or no GPU
        without ``interpret=True``.
    """
    n, k, r = check_operands(x, w, a, b, smooth, bias)
    act = None if act_fmt is None else _kernel_spec(act_fmt, "activation format").label
    if act_tensor_scale is not None and act not in _NV_LABELS:
        raise ValueError("act_tensor_scale applies to nvfp4 activations only")
    m = int(np.prod(x.shape[:-1]))
    if m == 0:
        return jnp.zeros((*x.shape[:-1], n), x.dtype)
    three_parts = act is None and not a16_bf16 and not (x.dtype == jnp.bfloat16 and smooth is None)
    bm, bn, bk, nw, ns = kernel_tiles(
        m, n, w.codes.shape[1] * 2, three_parts=three_parts, w_fmt=w.spec.name,
        block_m=block_m, block_n=block_n, block_k=block_k, num_stages=num_stages,
    )  # fmt: skip
    for name, v, lo in (("block_m", bm, 16), ("block_n", bn, 16), ("block_k", bk, 32)):
        if not _is_pow2(v) or v < lo:
            raise ValueError(f"{name} must be a power of two >= {lo}, got {v}")
    nkt = _round_up(k, bk) // bk
    split = choose_split(-(-m // bm), _round_up(n, bn) // bn, nkt) if split_k is None else split_k
    if not _is_pow2(split) or nkt % split:
        raise ValueError(
            f"split_k must be a power of two dividing the {nkt} K tiles of {bk}, got {split}"
        )
    _check_backend(interpret)
    return matmul_impl(
        x,
        w,
        a,
        b,
        smooth,
        bias,
        act_tensor_scale,
        act=act,
        tiles=(bm, bn, bk),
        warps=(num_warps or nw, num_stages or ns),
        a16_bf16=a16_bf16,
        interpret=interpret,
        split=split,
    )


@functools.partial(
    jax.jit, static_argnames=("act", "tiles", "warps", "a16_bf16", "interpret", "split")
)
def matmul_impl(
    x, w, a, b, smooth, bias, act_tensor_scale, *, act, tiles, warps, a16_bf16, interpret, split=1
):
    bm, bn, bk = tiles
    cparams = _compiler_params(interpret, *warps)
    n, k = w.shape
    r = 0 if a is None else a.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    wfmt = w.spec.name
    blk = w.spec.block

    # Padding (docs/spec/kernels.md §8). It is a no-op for aligned shapes (LLM widths are multiples
    # of 64);
    # padded codes, scale bytes, factor rows and activations are zero, so they add exact zeros.
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
    rp = max(16, 1 << (r - 1).bit_length()) if r else 0
    # Kernel 1 takes the divisor s and forms fl32(1/s) itself (div.rn: the same bits as
    # ``smooth_reciprocal``), so no XLA kernel runs before it.
    s_div = None if smooth is None else _pad2(smooth.astype(jnp.float32).reshape(1, k), 1, kp, 1.0)
    a2 = None if r == 0 else _pad2(a, kp, rp)
    codes = _pad2(w.codes, np_, kp // 2)
    sbytes = _pad2(jax.lax.bitcast_convert_type(w.scales, jnp.uint8), np_, kp // blk)

    # The nvfp4 tensor parts of the decode (1/gs for "nvfp4", g for "nvfp4-modelopt") are applied
    # to the f32 accumulator: the block values code·s stay exact in bf16.
    # Both kernels take the raw scalars and form the scales themselves: the only XLA kernel
    # before them is the max|x/s| reduction of a dynamic nvfp4 activation scale.
    g_x, gx_kind, gw_kind = None, None, None
    if act in _NV_LABELS:
        conv = "ct" if act == "nvfp4" else "mo"
        if act_tensor_scale is not None:
            g_x, gx_kind = jnp.asarray(act_tensor_scale, jnp.float32).reshape(()), conv
        else:
            g_x, gx_kind = _act_amax(x2, smooth), "amax-" + conv
    if wfmt == "nvfp4":
        gw_kind = "ct" if w.spec.label == "nvfp4" else "mo"

    # Rows are independent (every output row depends only on its x row), so x and y are not
    # padded to bm rows: the edge blocks' loads and stores are masked (Triton) / padded and
    # sliced (interpret mode). Only a K or N that is not a tile multiple is padded in memory.
    xp = x2 if kp == k else _pad2(x2, m, kp)
    # Kernel 1 reads x once: t = (x/s)·A and the activation operand (W4A4: quantized values;
    # W4A16: x/s as bf16 parts — three whose sum is exact, or one when x is bf16 without
    # smoothing (exact) or in the a16_bf16 fast mode (rounded)). At decode it runs one program
    # per (16-row block, K slab) and t comes as Kp/bk partial sums, added in kernel 2's epilogue;
    # with many row blocks (prefill) one program per 16 rows loops over K.
    if act is not None:
        form = "bf16"
    else:
        exact_bf16 = x.dtype == jnp.bfloat16 and smooth is None
        form = "parts1" if (exact_bf16 or a16_bf16) else "parts3"
    prep = act_prepare_call(
        xp,
        s_div,
        a2,
        None if g_x is None else g_x.reshape(1, 1),
        act=act,
        form=form,
        bm=_K1_BM,
        bk=bk,
        split=mp // _K1_BM < _K1_SPLIT_MAX_BLOCKS,
        interpret=interpret,
        rows=mp,
        # Kernel 1 holds x slabs, A slabs and three bf16 parts: 8 warps keep it out of spills.
        compiler_params=_compiler_params(interpret, 8, warps[1]),
        g_is_amax=gx_kind is not None and gx_kind.startswith("amax"),
    )
    xin = prep["xa"][None] if act is not None else prep["xp"]

    nparts = xin.shape[0]
    args = [xin]
    # Split-K (``split`` > 1): program (i, j, s) reduces the K slice s of Kp/split columns and
    # writes an f32 partial [split, M, Np]; XLA sums the partials (one small fusion).
    ks = kp // split
    in_specs = [pl.BlockSpec((nparts, bm, ks), lambda i, j, s: (0, i, s))]
    args += [codes, sbytes]
    in_specs += [
        pl.BlockSpec((bn, ks // 2), lambda i, j, s: (j, s)),
        pl.BlockSpec((bn, ks // blk), lambda i, j, s: (j, s)),
    ]
    for v in (g_x, None if gw_kind is None else jnp.asarray(w.tensor_scale, jnp.float32)):
        if v is not None:
            args.append(v.reshape(1, 1))
            in_specs.append(pl.BlockSpec((1, 1), lambda i, j, s: (0, 0)))
    if r:
        nt = prep["t"].shape[0]
        args += [prep["t"], _pad2(b, np_, rp)]
        in_specs += [
            pl.BlockSpec((nt, bm, rp), lambda i, j, s: (0, i, 0)),
            pl.BlockSpec((bn, rp), lambda i, j, s: (j, 0)),
        ]
    if bias is not None:
        args.append(_pad2(bias.reshape(1, n), 1, np_))
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, s: (0, j)))
    kernel = functools.partial(
        _gemm_kernel,
        gx=gx_kind,
        gw=gw_kind,
        has_lr=r > 0,
        has_bias=bias is not None,
        w_fmt=wfmt,
        bk=bk,
        interpret=interpret,
        split=split,
    )
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((m, np_), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, m, np_), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bm, np_ // bn, split),
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=cparams,
        name="arhq_fp4_lowrank_gemm",
    )(*args)
    if split > 1:
        y = jnp.sum(y, axis=0).astype(x.dtype)
    if np_ != n:
        y = y[:, :n]
    return y.reshape(*lead, n)


def _act_amax(x2, smooth):
    """max|x/s| over the finite elements (f32 scalar), as ``formats.nvfp4_tensor_scale``."""
    a = jnp.abs(smooth_input(x2, smooth).astype(jnp.float32))
    # (No ``initial=0``: x is not empty and the masked values are >= 0; with it XLA runs a
    # second, scalar kernel for the maximum with 0.)
    return jnp.max(jnp.where(jnp.isfinite(a), a, 0.0))


def _act_tensor_scale(x2, smooth, static_scale, act: str):
    """nvfp4 activation tensor scale in ``act``'s convention: the static scale, or
    formats.nvfp4_tensor_scale(x/s) over all of x."""
    if static_scale is not None:
        return jnp.asarray(static_scale, jnp.float32).reshape(())
    return formats.nvfp4_tensor_scale(smooth_input(x2, smooth), act)


def quantize_activations(
    x: jax.Array,
    act_fmt,
    smooth: jax.Array | None = None,
    *,
    tensor_scale=None,
    interpret: bool = False,
    block_m: int | None = None,
    block_k: int | None = None,
):
    """Kernel 1 in its packed (Blackwell) form: quantize x/s like ``formats.quantize``.

    Args:
      x: ``[M, K]`` f32/bf16; smooth ``[K]`` or None; act_fmt "nvfp4" / "mxfp4".
    Returns:
      ``(codes uint8 [M, K_pad/2], scales [M, K_pad/B] in the storage dtype, g f32 scalar)``,
      bit-identical to ``formats.quantize(smooth_input(x, smooth), act_fmt)``'s codes, scales and
      tensor_scale.
    """
    spec = _kernel_spec(act_fmt, "activation format")
    x = jnp.asarray(x)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a 2-D float array [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if smooth is not None and tuple(smooth.shape) != (k,):
        raise ValueError(f"smooth must have shape ({k},), got {tuple(smooth.shape)}")
    if tensor_scale is not None and spec.name != "nvfp4":
        raise ValueError("tensor_scale applies to nvfp4 activations only")
    bm, _, bk, nw, ns = choose_tiles(m, 64, _round_up(k, 32), block_m, None, block_k)
    _check_backend(interpret)
    return _quantize_impl(
        x, smooth, tensor_scale, spec=spec, tiles=(bm, bk), warps=(nw, ns), interpret=interpret
    )


@functools.partial(jax.jit, static_argnames=("spec", "tiles", "warps", "interpret"))
def _quantize_impl(x, smooth, tensor_scale, *, spec, tiles, warps, interpret):
    bm, bk = tiles
    m, k = x.shape
    mp, kp = _round_up(m, bm), _round_up(k, bk)
    # Kernel 1 takes the divisor s and forms fl32(1/s) itself (div.rn: the same bits as
    # ``smooth_reciprocal``), so no XLA kernel runs before it.
    s_div = None if smooth is None else _pad2(smooth.astype(jnp.float32).reshape(1, k), 1, kp, 1.0)
    nv = spec.name == "nvfp4"
    g = _act_tensor_scale(x, smooth, tensor_scale, spec.label) if nv else None
    out = act_prepare_call(
        _pad2(x, mp, kp),
        s_div,
        None,
        None if g is None else g.reshape(1, 1),
        act=spec.label,
        form="packed",
        bm=bm,
        bk=bk,
        split=True,
        interpret=interpret,
        compiler_params=_compiler_params(interpret, max(4, warps[0]), warps[1]),
    )
    k_pad = _round_up(k, spec.block)
    codes = out["codes"][:m, : k_pad // 2]
    sbytes = out["scale_bytes"][:m, : k_pad // spec.block]
    scales = jax.lax.bitcast_convert_type(sbytes, spec.scale_dtype)
    return codes, scales, (jnp.float32(1.0) if g is None else g)
