"""The ``arhq-jax`` command line end to end, on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.cli.main import main
from converters import load_model

pytestmark = pytest.mark.slow


def test_quantize_eval_generate_convert(tiny_dir, tmp_path, capsys):
    ck = tmp_path / "ckpt"
    common = ["--model", str(tiny_dir)]
    rc = main(["quantize", *common, "--method", "arhq", "--rank", "8", "--calib-tokens", "1024",
               "--calib-seq-len", "128", "--out", str(ck)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "calibration" in out and "MiB" in out
    assert (
        "layout: compressed-tensors nvfp4-pack-quantized + LoRA adapter lora/ (14 ct-nvfp4)" in out
    )
    _, _, quant = checkpoint.load(ck)
    assert quant["method"] == "arhq" and quant["rank"] == 8 and quant["calib_tokens"] == 1024

    rc = main(["eval", *common, "--quantized", str(ck), "--seq-len", "128", "--max-chunks", "2",
               "--json"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ppl", "kl", "top1", "tokens", "float_ppl", "quantized", "weights_only"} <= set(res)
    assert res["tokens"] == 2 * 127 and res["kl"] > 0 and 0 <= res["top1"] <= 1

    rc = main(["generate", *common, "--quantized", str(ck), "--prompt", "def f(x):",
               "--max-new-tokens", "4"])  # fmt: skip
    assert rc == 0

    dst = tmp_path / "tiny.orbax"
    assert main(["convert", str(tiny_dir), str(dst)]) == 0
    a, b = load_model(str(dst), tokenizer=False), load_model(str(tiny_dir), tokenizer=False)
    np.testing.assert_array_equal(np.asarray(a.params.embed), np.asarray(b.params.embed))


def test_cli_errors_name_the_problem(tiny_dir, tmp_path, capsys):
    rc = main(["quantize", "--model", str(tiny_dir), "--calib-tokens", "10000000",
               "--out", str(tmp_path / "x")])  # fmt: skip
    assert rc == 2 and "calibration text is too short" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    rc = main(["quantize", "--model", str(tiny_dir), "--rank", "65", "--out", str(tmp_path / "y")])
    assert rc == 2 and "rank 65 is too large for q_proj" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tmp_path / "missing")])
    assert rc == 2 and "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_dir), "--method", "nope", "--out", "z"])
    # A checkpoint of another model is refused.
    ck = tmp_path / "ck"
    main(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--calib-tokens", "256",
          "--calib-seq-len", "128", "--out", str(ck)])  # fmt: skip
    capsys.readouterr()
    rc = main(["eval", "--model", "smollm2", "--quantized", str(ck), "--max-chunks", "1"])
    assert rc == 2 and "made from another model" in capsys.readouterr().err
