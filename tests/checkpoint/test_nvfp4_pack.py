"""The compressed-tensors nvfp4-pack-quantized layout (arhq_jax.checkpoint.nvfp4_pack) against
compressed-tensors
itself: its own decompression of our arrays is bit-identical to formats.dequantize, its own
quantization of the same f32 weight gives our codes, scales and global scale, and its pydantic
classes write / parse our quantization_config."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from arhq_jax.checkpoint import nvfp4_pack as C
from arhq_jax.numerics import formats as F

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")

from _ct_reference import SCHEME, ct_decompress  # noqa: E402
from compressed_tensors.compressors.model_compressors.model_compressor import (  # noqa: E402
    ModelCompressor,
)
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    QuantizationStatus,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import (  # noqa: E402
    calculate_qparams,
    generate_gparam,
)

F32 = np.float32


def _bf16(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.bfloat16), F32)


def _weights() -> dict[str, np.ndarray]:
    """bf16-valued f32 weights covering the cases where the conventions could part."""
    rng = np.random.default_rng(0)
    cases = {}
    cases["normal"] = _bf16(rng.standard_normal((64, 256)) * 0.02)
    t = rng.standard_t(2, (48, 512)) * np.exp(rng.standard_normal((48, 1)) * 2)  # heavy tails
    cases["heavy_tailed_rows"] = _bf16(t * 0.01)
    z = _bf16(rng.standard_normal((32, 128)))
    z[3] = 0.0  # an all-zero row
    z[5, 16:48] = 0.0  # all-zero blocks
    z[7, :16] = -0.0  # a block of -0.0
    cases["zero_blocks"] = z
    # Exact E2M1 ties: every block holds 6 (so s = 448, d = 1 with gs = 448) and midpoints.
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], F32)
    ties = rng.choice(np.concatenate([mids, -mids, [0.5, 1, 3, 4]]), (16, 64)).astype(F32)
    ties[:, ::16] = 6.0
    cases["exact_ties"] = ties
    # Tiny values: blocks flushed to the placeholder scale, subnormal E4M3 scales.
    tiny = _bf16(rng.standard_normal((16, 64)))
    tiny[1:] *= F32(1e-4) ** rng.integers(1, 3, (15, 1))
    tiny[4, :32] *= F32(1e-3)
    cases["tiny"] = _bf16(tiny)
    # Negative values rounding to zero (code 0x8), -0.0 and +0.0 (0x0) next to a large value.
    neg = _bf16(rng.standard_normal((8, 32)) * 1e-3)
    neg[:, ::16] = 1.0
    neg[:, 3::16] = -0.0
    neg[:, 5::16] = 0.0
    cases["negative_to_zero"] = neg
    cases["whole_tensor_tiny"] = _bf16(rng.standard_normal((4, 32)) * 1e-30)
    cases["all_zero"] = np.zeros((4, 48), F32)
    cases["one_block"] = _bf16(rng.standard_normal((1, 16)))
    return cases


CASES = _weights()


def _ct_quantize(w: np.ndarray) -> dict[str, np.ndarray]:
    """compressed-tensors' own NVFP4 weight quantization (llm-compressor's steps) of f32 ``w``."""
    wt = torch.from_numpy(w)
    gs = generate_gparam(wt.min(), wt.max())
    wr = wt.reshape(w.shape[0], -1, 16)
    scale, _ = calculate_qparams(wr.amin(-1), wr.amax(-1), SCHEME.weights, global_scale=gs)
    state = {"weight": wt, "weight_scale": scale, "weight_global_scale": gs}
    out = NVFP4PackedCompressor.compress(state, SCHEME)
    return {
        "weight_packed": out["weight_packed"].numpy(),
        "weight_scale": out["weight_scale"].view(torch.uint8).numpy(),
        "weight_global_scale": out["weight_global_scale"].numpy(),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_ct_decompression_is_bit_identical(case):
    w = CASES[case]
    qt = F.quantize(w, "nvfp4")
    arrays = C.to_ct(qt)
    assert arrays["weight_packed"].dtype == np.uint8
    assert arrays["weight_packed"].shape == (w.shape[0], w.shape[1] // 2)
    assert arrays["weight_scale"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert arrays["weight_scale"].shape == (w.shape[0], w.shape[1] // 16)
    assert arrays["weight_global_scale"].dtype == F32
    assert arrays["weight_global_scale"].shape == (1,)
    ours = np.asarray(F.dequantize(qt, jnp.float32)).view(np.uint32)
    np.testing.assert_array_equal(ct_decompress(arrays, torch.float32), ours)  # sign of 0 too
    ours16 = np.asarray(F.dequantize(qt, jnp.bfloat16)).view(np.uint16)
    np.testing.assert_array_equal(ct_decompress(arrays, torch.bfloat16), ours16)
    # The round trip through the layout is lossless.
    back = C.from_ct(arrays, w.shape, "float32")
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qt.codes))
    np.testing.assert_array_equal(u8(back.scales), u8(qt.scales))
    assert float(back.tensor_scale) == float(qt.tensor_scale) and back.spec == qt.spec
    assert back.shape == qt.shape and back.axis == 1 and back.dtype == "float32"


def u8(a) -> np.ndarray:
    return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize("case", list(CASES))
def test_ct_quantization_gives_our_codes_and_scales(case):
    """compressed-tensors quantizing the same f32 weight writes exactly our arrays: 0 mismatches
    in codes, scales and the global scale (placeholders and the sign rule included)."""
    w = CASES[case]
    ours = C.to_ct(F.quantize(w, "nvfp4"))
    theirs = _ct_quantize(w)
    assert theirs["weight_global_scale"].view(np.uint32).tolist() == (
        ours["weight_global_scale"].view(np.uint32).tolist()
    )
    np.testing.assert_array_equal(u8(ours["weight_scale"]), theirs["weight_scale"])
    np.testing.assert_array_equal(ours["weight_packed"], theirs["weight_packed"])


def test_ct_conventions_and_what_differs_from_modelopt():
    """The ModelOpt convention decodes differently on bf16-like weights (compressed-tensors would
    read its arrays wrongly), which is why to_ct refuses it. (How often depends on amax: never
    for CASES["normal"], on most values for this weight.)"""
    w = _bf16(np.random.default_rng(2).standard_normal((64, 256)) * 0.02)
    q_mo = F.quantize(w, "nvfp4-modelopt")
    with pytest.raises(ValueError, match="ModelOpt's tensor-scale convention"):
        C.to_ct(q_mo)
    # Reading ModelOpt's arrays as compressed-tensors (g stored as gs, or 1/g) is not exact.
    arrays = {
        "weight_packed": np.asarray(q_mo.codes),
        "weight_scale": np.asarray(q_mo.scales),
        "weight_global_scale": (F32(1) / np.asarray(q_mo.tensor_scale, F32)).reshape(1),
    }
    mo = np.asarray(F.dequantize(q_mo, jnp.float32)).view(np.uint32)
    assert np.mean(ct_decompress(arrays, torch.float32) != mo) > 0.01


def test_input_global_scale_matches_generate_gparam():
    for amax in (F32(0.37), F32(13.5), F32(1.75), F32(1e-37), F32(0.0)):
        ours = C.input_global_scale(F.nvfp4_tensor_scale(amax))
        theirs = generate_gparam(torch.tensor(-amax), torch.tensor(amax)).numpy()
        assert ours.dtype == F32 and ours.shape == (1,)
        assert ours.view(np.uint32).tolist() == theirs.view(np.uint32).tolist(), amax
        assert C.act_scale_from_input_global_scale(ours) == ours[0]
    with pytest.raises(ValueError, match="ModelOpt"):
        C.input_global_scale(0.01, "nvfp4-modelopt")
    for bad in (0.0, -1.0, np.inf, np.nan, [1.0, 2.0]):
        with pytest.raises(ValueError, match="act_scale"):
            C.input_global_scale(bad)
    with pytest.raises(ValueError, match="float32 \\(1,\\)"):
        C.act_scale_from_input_global_scale(np.ones((1,), np.float64))
    with pytest.raises(ValueError, match="positive"):
        C.act_scale_from_input_global_scale(np.zeros((1,), F32))


@pytest.mark.parametrize("w4a4,preset", [(True, "NVFP4"), (False, "NVFP4A16")])
def test_quantization_config_is_what_compressed_tensors_writes(tmp_path, w4a4, preset):
    ignore = ["lm_head", "model.layers.0.mlp.down_proj"]
    ours = C.quantization_config(ignore, w4a4=w4a4)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.format = "nvfp4-pack-quantized"
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="nvfp4-pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    ModelCompressor(quantization_config=qc).update_config(str(tmp_path))
    theirs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert theirs.pop("version").split(".")[:2] == ours["version"].split(".")[:2]
    ours_cmp = dict(ours)
    ours_cmp.pop("version")
    assert json.dumps(ours_cmp, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    # compressed-tensors parses it back into the same scheme.
    parsed = QuantizationConfig.model_validate(ours)
    assert parsed.format == "nvfp4-pack-quantized" and parsed.ignore == ignore
    assert parsed.config_groups["group_0"] == scheme
    assert (parsed.config_groups["group_0"].input_activations is None) == (not w4a4)
    with pytest.raises(ValueError, match="ignore"):
        C.quantization_config("lm_head", w4a4=True)


def test_to_ct_refuses_what_the_layout_cannot_hold():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 200)).astype(F32)  # K % 16 != 0: our formats pad
    with pytest.raises(ValueError, match="K = 200 is not a multiple of 16"):
        C.to_ct(F.quantize(w, "nvfp4"))
    w = rng.standard_normal((8, 64)).astype(F32)
    with pytest.raises(ValueError, match="nvfp4 only, not mxfp4"):
        C.to_ct(F.quantize(w, "mxfp4"))
    with pytest.raises(ValueError, match="nvfp4 only, not nvfp4-paper"):
        C.to_ct(F.quantize(w, "nvfp4-paper", tile=(16, 16)))
    with pytest.raises(ValueError, match="axis 1"):
        C.to_ct(F.quantize(w, "nvfp4", axis=0))
    with pytest.raises(ValueError, match="2-D"):
        C.to_ct(F.quantize(w.reshape(2, 4, 64), "nvfp4"))
    with pytest.raises(ValueError, match="QTensor"):
        C.to_ct(w)


def test_from_ct_validates_every_tensor():
    w = CASES["normal"]
    good = C.to_ct(F.quantize(w, "nvfp4"))
    shape = w.shape

    def bad(match, shape=shape, dtype="bfloat16", **change):
        t = dict(good)
        for k, v in change.items():
            if v is None:
                t.pop(k)
            else:
                t[k] = v
        with pytest.raises(ValueError, match=match):
            C.from_ct(t, shape, dtype)

    bad("missing tensor 'weight_scale'", weight_scale=None)
    bad("unknown tensors \\['weight_zero_point'\\]", weight_zero_point=np.zeros(1, np.uint8))
    bad("weight_packed must be uint8", weight_packed=good["weight_packed"].astype(np.int8))
    bad("weight_packed must have shape \\(64, 128\\)", weight_packed=good["weight_packed"][:, :64])
    bad("weight_scale must be float8_e4m3fn", weight_scale=good["weight_scale"].astype(F32))
    bad("weight_scale must have shape", weight_scale=good["weight_scale"][:10])
    nan_scale = good["weight_scale"].copy()
    nan_scale.view(np.uint8)[0, 0] = 0x7F
    bad("1 NaN and 0 negative", weight_scale=nan_scale)
    neg_scale = good["weight_scale"].copy()
    neg_scale.view(np.uint8)[0, :2] |= 0x80
    bad("0 NaN and 2 negative", weight_scale=neg_scale)
    bad("weight_global_scale must be float32", weight_global_scale=np.ones(1, np.float64))
    bad("weight_global_scale must have shape \\(1,\\)", weight_global_scale=np.ones((), F32))
    bad("positive and finite", weight_global_scale=np.zeros(1, F32))
    bad("positive and finite", weight_global_scale=np.full(1, np.nan, F32))
    bad("not a multiple of 16", shape=(64, 200))
    bad("two positive ints", shape=(64,))
    bad("two positive ints", shape=(64, 0))
    bad("dtype must be one of", dtype="int8")
    # input_global_scale may sit beside the weight tensors.
    q = C.from_ct({**good, "input_global_scale": np.ones(1, F32)}, shape, "bfloat16")
    assert q.dtype == "bfloat16" and q.spec.label == "nvfp4"


N4 = [2688, -1344] + [0] * 14 + [0.01, -0.004] + [0] * 14 + [0.0005, -0.0001] + [0] * 14
V1 = [1.75, -0.4375, 0.21875, 0.109375, -0.0, 1e-3, -1e-3, 0.65625] + [0.0] * 8


@pytest.mark.parametrize(
    "x,gs_bits,scale_bytes,packed_hex",
    [
        # spec N4 with -0.0001 in the flushed block: gs = fl(2688·fl(1/2688)) = 1; the flushed
        # block stores the placeholder 0.125 (0x20) and the negative value rounds to 0x8.
        (N4, 0x3F800000, [0x7E, 0x01, 0x20], "d7" + "00" * 7 + "c7" + "00" * 7 + "80" + "00" * 7),
        # amax 1.75: gs = 1536.0001 (not 1536), -0.0 -> 0x0, -1e-3 -> 0x8.
        (V1, 0x44C00001, [0x7E], "b7 12 00 48 00 00 00 00"),
    ],
)
def test_golden_vectors_of_the_ct_convention(x, gs_bits, scale_bytes, packed_hex):
    """Test vectors of "nvfp4" produced by compressed-tensors itself (values checked live)."""
    x = np.array([x], F32)
    for arrays in (_ct_quantize(x), C.to_ct(F.quantize(x, "nvfp4"))):
        assert arrays["weight_global_scale"].view(np.uint32).tolist() == [gs_bits]
        assert u8(arrays["weight_scale"]).reshape(-1).tolist() == scale_bytes
        assert arrays["weight_packed"].tobytes() == bytes.fromhex(packed_hex)
