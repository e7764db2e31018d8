"""``arhq-jax quantize --preset best-w4a4`` and the issue-12 flags, on a tiny random Llama."""

from __future__ import annotations

import pytest

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from arhq_jax.run.config import PRESETS, preset

pytestmark = pytest.mark.slow


def test_preset_best_w4a4_quantizes_and_records_its_recipe(tiny_dir, tmp_path):
    ck = tmp_path / "ckpt"
    rc = main(["quantize", "--model", str(tiny_dir), "--preset", "best-w4a4",
               "--calib-tokens", "512", "--calib-seq-len", "128", "--out", str(ck)])  # fmt: skip
    assert rc == 0
    _, _, quant = checkpoint.load(ck)
    want = preset("best-w4a4").to_dict()
    for k in PRESETS["best-w4a4"]:
        assert quant[k] == want[k], k


def test_rotate_checkpoint_is_refused_before_any_work(tiny_dir, tmp_path, capsys):
    rc = main(["quantize", "--model", str(tiny_dir), "--rotate", "16", "--out",
               str(tmp_path / "x")])  # fmt: skip
    assert rc == 2
    assert "rotated" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_preset_is_an_argparse_error(tiny_dir):
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_dir), "--preset", "nope", "--out", "z"])
