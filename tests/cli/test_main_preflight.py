"""``quantize``'s pre-flight: cheap argument errors and the plan line come before the model
loads (the loaders are replaced by ones that fail the test if called)."""

from __future__ import annotations

import _tiny_cli as T
import pytest

import arhq_jax.api as api
import arhq_jax.cli.main as cli


class _Loaded(Exception):
    """The model loader was called."""


@pytest.fixture()
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise _Loaded("the model was loaded")

    for module in (cli, api):  # the CLI's commands and the API it runs for quantize
        for name in ("open_source", "load_model"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    return {"hf": T.write_hf_dir(d / "hf"), "gguf": T.write_gguf(d / "m.gguf"), "dir": d}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rank", "65"], "rank 65 is too large for q_proj"),
        (["--method", "gptq", "--group-size", "4096"], "--group-size 4096 is larger than"),
        (["--calib-seq-len", "1024"], "--calib-seq-len 1024"),
        (["--out", "/"], "root directory"),
        (["--out", "/usr"], "system directory"),
        (["--calib-text", "/nonexistent/x.txt"], "/nonexistent/x.txt"),
        (["--rotate", "64"], "rotated recipes"),
    ],
)
def test_errors_before_the_model_loads(models, no_load, capsys, flags, message):
    argv = ["quantize", "--model", str(models["hf"]), "--out", str(models["dir"] / "o"), *flags]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.count("\n") == 1, err
    assert not (models["dir"] / "o").exists()


def test_gguf_without_tokenizer_before_the_load(models, no_load, capsys):
    """The tiny GGUF has no tokenizer metadata: named from its header, before the load."""
    argv = ["quantize", "--model", str(models["gguf"]), "--out", str(models["dir"] / "o")]
    assert cli.main([*argv, "--rank", "65"]) == 2
    err = capsys.readouterr().err
    assert "m.gguf has no tokenizer (no tokenizer.ggml.model metadata)" in err
    assert err.count("\n") == 1


def test_missing_and_corrupt_models_before_the_load(models, no_load, capsys, tmp_path):
    rc = cli.main(["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "model source not found" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(models["gguf"].read_bytes()[:100])
    rc = cli.main(["quantize", "--model", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a readable GGUF file" in capsys.readouterr().err


def test_plan_line_comes_before_the_load(models, no_load, capsys):
    argv = ["quantize", "--model", str(models["hf"]), "--rank", "8", "--calib-tokens", "1024",
            "--calib-seq-len", "128", "--out", str(models["dir"] / "o")]  # fmt: skip
    with pytest.raises(_Loaded):
        cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    plan = [line for line in err if line.startswith("plan: ")]
    assert len(plan) == 1
    assert "plan: llama, 2 layers," in plan[0] and "1024 calibration tokens" in plan[0]


@pytest.mark.parametrize("cmd", [["eval"], ["generate", "--prompt", "x"]])
def test_eval_and_generate_flag_errors_before_the_load(models, no_load, capsys, cmd, tmp_path):
    rc = cli.main([*cmd, "--model", str(models["hf"]), "--weights-only"])
    assert rc == 2 and "--weights-only applies to a --quantized" in capsys.readouterr().err
    rc = cli.main([*cmd, "--model", str(models["hf"]), "--quantized", str(tmp_path / "none")])
    assert rc == 2 and "quantized checkpoint not found" in capsys.readouterr().err
