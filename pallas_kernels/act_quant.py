"""Kernel 1: prepare the activations (docs/spec/kernels.md §2), reading x from HBM once.

Per slab of ``bk`` columns (a multiple of 32, so 16- and 32-blocks align) it forms
x_s = f32(x)·fl32(1/s) (see ``qlinear.smooth_input``; 1/s by ``codecs.div_rn``), accumulates the
low-rank down-projection t += x_s·A (bf16 A: x_s as three bf16 parts on the tensor cores, exact
products; else f32) and writes the activation operand. Two grids:
  * ``split`` (decode, M <= 64): one program per (row block, slab), parallel over rows and K; t is
    written as one partial sum per slab ``[Kp/bk, Mp, r]`` (deterministic, no atomics), which
    kernel 2's epilogue adds;
  * otherwise one program per block of ``bm`` rows looping over K (a program owns whole rows).

The slab is read as its even and odd elements (two stride-2 loads, docs/spec/kernels.md §3) and the
activation operand is written as:
  * ``"bf16"``: values code × block scale (exact in bf16; the nvfp4 tensor part of the decode,
    1/gs_x or g_x, is applied later, on kernel 2's f32 accumulator), in per-slab order
    [even | odd], which is the order in which kernel 2 consumes the low and high nibbles of the
    weights;
  * ``"packed"``: canonical uint8 codes (element 2i in the low nibble) and scale bytes, the
    Blackwell form, bit-identical to ``formats.quantize``;
  * ``"parts1"`` / ``"parts3"`` (W4A16): x_s as one bf16 array or three whose f32 sum is x_s, in
    the same [even | odd] order.

K arrives padded to bk and r to a power of two >= 16; rows need not fill the last block (masked
edge loads; every row is independent); see ``fp4_matmul``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

import pallas_kernels.codecs as codecs
from arhq_jax.numerics.elements import HIGHEST


def expand_blocks(v: jax.Array, per_block: int) -> jax.Array:
    """``[rows, nb]`` -> ``[rows, nb * per_block]``, each value repeated (broadcast + reshape)."""
    rows, nb = v.shape
    return jnp.broadcast_to(v[:, :, None], (rows, nb, per_block)).reshape(rows, nb * per_block)


def block_amax(xe: jax.Array, xo: jax.Array, per_block: int) -> jax.Array:
    """Block max of |x| ``[rows, nb]`` from the even/odd halves ``[rows, h]``; per_block = B/2."""
    rows, h = xe.shape
    nb = h // per_block
    me = jnp.max(jnp.abs(xe).reshape(rows, nb, per_block), axis=-1)
    mo = jnp.max(jnp.abs(xo).reshape(rows, nb, per_block), axis=-1)
    return jnp.maximum(me, mo)


def _quant_halves(xe, xo, g, act: str, interpret: bool, values: bool = False):
    """Quantize one slab given as even/odd halves. Returns (codes_e, codes_o, scale f32, byte), or
    with ``values`` the E2M1 values instead of the codes (``codecs.e2m1_round``: the same values
    up to the sign of zero, without forming the codes; what the bf16 operand needs).

    ``act`` is a format label: "nvfp4" (compressed-tensors convention, g = gs), "nvfp4-modelopt"
    (g is the decode multiplier) or "mxfp4". Bit for bit as ``formats.block_params`` /
    ``quantize_blocks``; every division is correctly rounded (``codecs.div_rn``).
    nvfp4 "ct": raw = gs·fl(amax/6), s = E4M3_RNE(clip(raw, 0, 448)) or 0.125 where that is 0,
    d = fl(s/gs), codes = E2M1_RNE(clip(x/d, ±6)) with the sign of a negative nonzero x.
    nvfp4-modelopt (docs/spec/formats.md §3): raw = (amax/6)/g, s as above (0 kept), d = fl32(s·g),
    all-zero codes when s = 0.
    mxfp4 (docs/spec/formats.md §5, floor rule): e = floor(log2 amax) - 2; x·2^-e is exact and
    never needs the
    subnormal 2^-127 (which the f32 flush-to-zero would turn into 0).
    """
    hb = 16 if act == "mxfp4" else 8  # elements of one block in each parity half
    amax = block_amax(xe, xo, hb)
    if act != "mxfp4":
        ct = act == "nvfp4"
        a6 = codecs.div_rn(amax, 6.0, interpret=interpret)
        raw = g * a6 if ct else codecs.div_rn(a6, g, interpret=interpret)
        s = codecs.e4m3_round(jnp.clip(raw, 0.0, 448.0))
        if ct:
            s = jnp.where(s == 0, 0.125, s)  # compressed-tensors' placeholder
        byte = codecs.e4m3_byte(s)
        d = codecs.div_rn(s, g, interpret=interpret) if ct else s * g
        d = expand_blocks(d, hb)
        live = d > 0
        safe_d = jnp.where(live, d, 1.0)
        ve = jnp.clip(codecs.div_rn(xe, safe_d, interpret=interpret), -6.0, 6.0)
        vo = jnp.clip(codecs.div_rn(xo, safe_d, interpret=interpret), -6.0, 6.0)
        if values:
            qe, qo = codecs.e2m1_round(ve), codecs.e2m1_round(vo)
            return jnp.where(live, qe, 0.0), jnp.where(live, qo, 0.0), s, byte
        ce = codecs.e2m1_code(ve, xe if ct else None)
        co = codecs.e2m1_code(vo, xo if ct else None)
        return jnp.where(live, ce, 0), jnp.where(live, co, 0), s, byte
    byte = codecs.e8m0_floor_byte(amax)
    inv = expand_blocks(jax.lax.bitcast_convert_type((254 - byte) << 23, jnp.float32), hb)
    ve, vo = jnp.clip(xe * inv, -6.0, 6.0), jnp.clip(xo * inv, -6.0, 6.0)
    if values:
        return codecs.e2m1_round(ve), codecs.e2m1_round(vo), codecs.e8m0_value(byte), byte
    return codecs.e2m1_code(ve), codecs.e2m1_code(vo), codecs.e8m0_value(byte), byte


def _act_kernel(
    *refs,
    has_s: bool,
    has_a: bool,
    act: str | None,
    form: str,
    bk: int,
    interpret: bool,
    g_is_amax: bool = False,
):
    it = iter(refs)
    x_ref = next(it)
    s_ref = next(it) if has_s else None
    a_ref = next(it) if has_a else None
    g_ref = next(it) if _is_nv(act) else None
    t_ref = next(it) if has_a else None
    outs = () if form == "none" else (next(it), next(it)) if form == "packed" else (next(it),)
    bm = x_ref.shape[0]
    h = bk // 2
    nk = x_ref.shape[1] // bk
    g = g_ref[...] if g_ref is not None else None
    if g is not None and g_is_amax:  # the tensor scale from max|x/s| (XLA's one reduction)
        g = codecs.nvfp4_scale_from_amax(g, act == "nvfp4", interpret=interpret)
    hb = 8 if _is_nv(act) else 16
    nb = h // hb

    def body(kt, t):
        k0 = kt * bk
        xe = x_ref[:, pl.ds(k0, h, stride=2)].astype(jnp.float32)
        xo = x_ref[:, pl.ds(k0 + 1, h, stride=2)].astype(jnp.float32)
        if has_s:  # x·fl32(1/s), as qlinear.smooth_input (div_rn: correctly rounded)
            xe = xe * codecs.div_rn(1.0, s_ref[:, pl.ds(k0, h, stride=2)], interpret=interpret)
            xo = xo * codecs.div_rn(1.0, s_ref[:, pl.ds(k0 + 1, h, stride=2)], interpret=interpret)
        if has_a and a_ref.dtype == jnp.bfloat16:
            # bf16 tensor cores: x_s as three bf16 parts (exact sum) times bf16 A (exact); one
            # part when x_s is x itself in bf16 (no smoothing: the other two parts are zero).
            ae = a_ref[pl.ds(k0, h, stride=2), :]
            ao = a_ref[pl.ds(k0 + 1, h, stride=2), :]
            n_t = 1 if x_ref.dtype == jnp.bfloat16 and not has_s else 3
            for pe, po in zip(codecs.bf16_parts(xe, n_t), codecs.bf16_parts(xo, n_t), strict=True):
                t = t + jnp.dot(pe, ae, preferred_element_type=jnp.float32)
                t = t + jnp.dot(po, ao, preferred_element_type=jnp.float32)
        elif has_a:
            ae = a_ref[pl.ds(k0, h, stride=2), :].astype(jnp.float32)
            ao = a_ref[pl.ds(k0 + 1, h, stride=2), :].astype(jnp.float32)
            t = t + jnp.dot(xe, ae, precision=HIGHEST, preferred_element_type=jnp.float32)
            t = t + jnp.dot(xo, ao, precision=HIGHEST, preferred_element_type=jnp.float32)
        if form.startswith("parts"):  # W4A16: x_s as bf16 parts, [even | odd] per slab
            (xp_ref,) = outs
            n = xp_ref.shape[0]
            for p, (pe, po) in enumerate(
                zip(codecs.bf16_parts(xe, n), codecs.bf16_parts(xo, n), strict=True)
            ):
                xp_ref[p, :, pl.ds(k0, h)] = pe
                xp_ref[p, :, pl.ds(k0 + h, h)] = po
        elif act is not None:
            if form == "bf16":  # values code × block scale, exact in bf16: no codes formed
                qe, qo, s, _ = _quant_halves(xe, xo, g, act, interpret, values=True)
                (xa_ref,) = outs
                sx = expand_blocks(s, hb)
                xa_ref[:, pl.ds(k0, h)] = (qe * sx).astype(xa_ref.dtype)
                xa_ref[:, pl.ds(k0 + h, h)] = (qo * sx).astype(xa_ref.dtype)
            else:
                ce, co, s, byte = _quant_halves(xe, xo, g, act, interpret)
                c_ref, sc_ref = outs
                c_ref[:, pl.ds(kt * h, h)] = (ce | (co << 4)).astype(jnp.uint8)
                sc_ref[:, pl.ds(kt * nb, nb)] = byte.astype(jnp.uint8)
        return t

    r = a_ref.shape[1] if has_a else 1
    t = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, r), jnp.float32))
    if has_a:
        t_ref[0] = t


def _is_nv(act: str | None) -> bool:
    return act in ("nvfp4", "nvfp4-modelopt")


def act_prepare_call(
    x: jax.Array,
    s: jax.Array | None,
    a: jax.Array | None,
    g: jax.Array | None,
    *,
    act: str | None,
    form: str,
    bm: int,
    bk: int,
    split: bool,
    interpret: bool,
    rows: int | None = None,
    compiler_params=None,
    g_is_amax: bool = False,
):
    """Run kernel 1 on padded operands.

    Args:
      x: ``[M, Kp]`` f32/bf16, Kp % bk == 0. Rows need not fill the last block of bm: its loads
        are masked and its extra rows are garbage in the outputs (every row is independent).
      s: ``[1, Kp]`` f32 smoothing divisor s (padding 1.0) or None; the kernel multiplies by
        fl32(1/s) like ``formats.smooth_input``.
      a: ``[Kp, rp]`` down-projection (padding rows/columns 0) or None (rank 0).
      g: ``[1, 1]`` f32 nvfp4 activation tensor scale, in the convention of ``act`` (gs for
        "nvfp4", g for "nvfp4-modelopt"); required for both. With ``g_is_amax`` it is
        max|x/s| instead and the kernel forms the scale (``codecs.nvfp4_scale_from_amax``).
      act: "nvfp4", "nvfp4-modelopt", "mxfp4" or None (W4A16).
      form: "bf16" or "packed" (W4A4 activation operand), "parts1" / "parts3" (W4A16: x/s as one
        bf16 array, or three whose f32 sum is exact) or "none" (t only).
      split: one program per (row block, slab of bk columns) — parallel over rows and K, for
        decode — with t written as one partial sum per slab; else one program per row block
        looping over K.
    Returns:
      dict (Mp = ``rows``, default M rounded up to bm) with ``t`` ``[nt, Mp, rp]`` f32 (nt
      partial sums over K: Kp/bk when split, else 1; when a is given) and the activation
      operand: ``xa`` ``[Mp, Kp]`` bf16 in per-slab [even | odd] order, ``codes`` uint8
      ``[Mp, Kp/2]`` and ``scale_bytes`` uint8 ``[Mp, Kp/B]``, or ``xp`` ``[P, Mp, Kp]`` bf16 in
      per-slab [even | odd] order.
    """
    kp = x.shape[1]
    mp = rows or -(-x.shape[0] // bm) * bm  # the outputs' rows: whole blocks
    if _is_nv(act) and g is None:
        raise ValueError("nvfp4 activations need the tensor scale g")
    nks = kp // bk if split else 1
    grid = (mp // bm, nks)

    def cols(width):  # this program's block of a [rows, width] array (a slab when split)
        w = width // nks
        return pl.BlockSpec((bm, w), lambda i, j: (i, j))

    in_specs, args = [cols(kp)], [x]
    if s is not None:
        in_specs.append(pl.BlockSpec((1, kp // nks), lambda i, j: (0, j)))
        args.append(s)
    if a is not None:
        in_specs.append(pl.BlockSpec((kp // nks, a.shape[1]), lambda i, j: (j, 0)))
        args.append(a)
    if _is_nv(act):
        in_specs.append(pl.BlockSpec((1, 1), lambda i, j: (0, 0)))
        args.append(g)
    names, out_shape, out_specs = [], [], []
    if a is not None:
        names.append("t")
        out_shape.append(jax.ShapeDtypeStruct((nks, mp, a.shape[1]), jnp.float32))
        out_specs.append(pl.BlockSpec((1, bm, a.shape[1]), lambda i, j: (j, i, 0)))
    if form == "bf16":
        names.append("xa")
        out_shape.append(jax.ShapeDtypeStruct((mp, kp), jnp.bfloat16))
        out_specs.append(cols(kp))
    elif form == "packed":
        blk = 16 if _is_nv(act) else 32
        names += ["codes", "scale_bytes"]
        out_shape.append(jax.ShapeDtypeStruct((mp, kp // 2), jnp.uint8))
        out_specs.append(cols(kp // 2))
        out_shape.append(jax.ShapeDtypeStruct((mp, kp // blk), jnp.uint8))
        out_specs.append(cols(kp // blk))
    elif form.startswith("parts"):
        n = int(form[5:])
        names.append("xp")
        out_shape.append(jax.ShapeDtypeStruct((n, mp, kp), jnp.bfloat16))
        out_specs.append(pl.BlockSpec((n, bm, kp // nks), lambda i, j: (0, i, j)))
    if not names:
        return {}
    kernel = functools.partial(
        _act_kernel,
        has_s=s is not None,
        has_a=a is not None,
        act=act,
        form=form,
        bk=bk,
        interpret=interpret,
        g_is_amax=g_is_amax,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=grid,
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        interpret=interpret,
        compiler_params=compiler_params,
        name="arhq_act_prepare",
    )(*args)
    return dict(zip(names, outs, strict=True))
