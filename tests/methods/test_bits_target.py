"""``bits_target`` (``--bits-target B``): per-projection ranks from the exact knapsack of
``rank_budget.allocate_bits``, so that the stored bits per weight of the quantized projections
are at most B, counted here from the written checkpoint's own files (their safetensors headers:
every tensor of a quantized projection, LoRA factors included, over Σ out·in)."""

from __future__ import annotations

import json
import struct

import _tiny_cli as T
import pytest

from arhq_jax.cli.main import main
from arhq_jax.run.config import QuantConfig

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _header(path):
    """{tensor name: stored bytes} of a .safetensors file, from its JSON header alone."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items()
            if k != "__metadata__"}  # fmt: skip


def checkpoint_bits(out):
    """(stored bits per weight of the quantized projections, {prefix: LoRA rank})."""
    hf = json.loads((out / "config.json").read_text())
    mods = {p: e for p, e in hf["arhq_jax"]["modules"].items() if p.rsplit(".", 1)[1] in PROJS}
    sizes = _header(out / "model.safetensors")
    if (out / "lora").is_dir():
        sizes |= _header(out / "lora" / "adapter_model.safetensors")
    bits, weights, ranks = 0, 0, {}
    layers = hf["num_hidden_layers"]
    h, i = hf["hidden_size"], hf["intermediate_size"]
    nh, nkv, d = (
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
        h // hf["num_attention_heads"],
    )
    shape = {"q_proj": (nh * d, h), "k_proj": (nkv * d, h), "v_proj": (nkv * d, h),
             "o_proj": (h, nh * d), "gate_proj": (i, h), "up_proj": (i, h),
             "down_proj": (h, i)}  # fmt: skip
    assert len(mods) == 7 * layers
    for prefix in mods:
        o, k = shape[prefix.rsplit(".", 1)[1]]
        weights += o * k
        mine = [n for n in sizes if n.startswith(prefix + ".")
                or n.startswith(f"base_model.model.{prefix}.")]  # fmt: skip
        assert mine, prefix
        bits += 8 * sum(sizes[n] for n in mine)
        a = f"base_model.model.{prefix}.lora_A.weight"
        ranks[prefix] = sizes[a] // (k * 2) if a in sizes else 0  # bf16 Aᵀ [r, in]
    return bits / weights, ranks


def _shape(prefix):
    """(out, in) of a projection of the tiny Llama of _tiny_cli (H 64, I 128, 4×16 q, 2 kv)."""
    return {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
            "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}[
        prefix.rsplit(".", 1)[1]]  # fmt: skip


@pytest.mark.parametrize("target", [4.75, 6.0])
def test_bits_target_from_the_written_files(tmp_path, capsys, target):
    src = T.write_hf_dir(tmp_path / "src")
    out = tmp_path / "ck"
    rc = main(["quantize", "--model", str(src), "--method", "arhq", "--rank", "8",
               "--factor-dtype", "bfloat16", "--bits-target", str(target), "--calib-tokens",
               "512", "--calib-seq-len", "64", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    bpw, ranks = checkpoint_bits(out)
    assert bpw <= target
    used = sorted(set(ranks.values()))
    assert used != [0]  # some branch was bought
    # Optimality, seen from the files: the grid is 0, 4, … 24 and every tail objective strictly
    # decreases with the rank, so the bits left over are less than the cost of the next 4
    # ranks (bf16) of any projection below the top.
    tot_w = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    spare = target * tot_w - bpw * tot_w
    steps = [4 * sum(_shape(p)) * 16 for p, r in ranks.items() if r < 24]
    assert not steps or spare < min(steps), (spare, steps)
    recipe = json.loads((out / "config.json").read_text())["arhq_jax"]["recipe"]
    assert recipe["bits_target"] == target


def test_bits_target_errors(tmp_path, capsys):
    src = T.write_hf_dir(tmp_path / "src")
    x = str(tmp_path / "x")
    rc = main(["quantize", "--model", str(src), "--method", "arhq", "--bits-target", "4.0",
               "--calib-tokens", "256", "--calib-seq-len", "64", "--out", x])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("arhq-jax quantize: error: bits target 4 is below the 4.51")
    assert "warning" not in err  # refused before the model is read for the plan
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(src), "--bits-target", "nan", "--out", "z"])
    for bad in (float("nan"), 0.0, -1.0, True):
        with pytest.raises(ValueError, match="bits_target must be a finite number > 0"):
            QuantConfig(method="arhq", bits_target=bad)
    with pytest.raises(ValueError, match="not both"):
        QuantConfig(method="arhq", bits_target=5.0, rank_budget=True)
    with pytest.raises(ValueError, match="needs a low-rank branch"):
        QuantConfig(method="svdquant", rank=0, bits_target=5.0)
    assert QuantConfig(method="arhq", bits_target=5.25).label().startswith("arhq-r32-b5.25")


@pytest.mark.parametrize("name", ["best-w4a4-lean", "best-w4a16"])
def test_lean_presets_export_within_their_bits(tmp_path, capsys, name):
    """The 4.75-bit presets write a compressed-tensors NVFP4 (+ lora/) checkpoint of at most
    4.75 stored bits per weight, with the recipe they name."""
    from arhq_jax.checkpoint import store as checkpoint
    from arhq_jax.run.config import PRESETS, preset

    src = T.write_hf_dir(tmp_path / "src")
    out = tmp_path / "ck"
    rc = main(["quantize", "--model", str(src), "--preset", name, "--calib-tokens", "512",
               "--calib-seq-len", "64", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    bpw, ranks = checkpoint_bits(out)
    assert bpw <= 4.75
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert {e["kind"] for e in hf["arhq_jax"]["modules"].values()} == {"ct-nvfp4"}
    _, _, quant = checkpoint.load(out)
    want = preset(name).to_dict()
    for k in PRESETS[name]:
        assert quant[k] == want[k], k
