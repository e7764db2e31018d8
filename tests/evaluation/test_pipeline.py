"""The evaluation pipeline never reports a number it did not compute from valid input: token ids
outside the model's vocabulary and non-finite scores are one-line errors (the CLI exits 2 and
prints no JSON), for ``eval`` and for ``quantize``'s calibration ids alike."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import CFG
from _tiny_cli import config, params, tokenizer

from arhq_jax.cli import main as cli
from arhq_jax.evaluation import metrics as ev
from arhq_jax.evaluation.pipeline import calibration_ids, check_finite_scores, evaluate_models


def test_token_ids_outside_the_vocabulary_are_refused(model):
    p, ids = model
    tokens = np.arange(256, dtype=np.int32) % CFG.vocab_size
    res = evaluate_models({}, p, CFG, tokens, seq_len=64, max_chunks=2, progress=False)
    assert math.isfinite(res["float"]["ppl"])
    bad = tokens.copy()
    bad[70] = CFG.vocab_size
    with pytest.raises(ValueError, match=rf"token id {CFG.vocab_size} is outside .*\[0, 128\)"):
        evaluate_models({}, p, CFG, bad, seq_len=64, max_chunks=2, progress=False)
    with pytest.raises(ValueError, match=r"calibration text: token id 128 is outside"):
        calibration_ids(bad, 128, 64, vocab_size=CFG.vocab_size)
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        calibration_ids(np.full(128, -1), 128, 64, vocab_size=CFG.vocab_size)
    assert calibration_ids(bad, 128, 64).shape == (2, 64)  # (no vocabulary given: not checked)


def test_a_non_finite_score_is_an_error(model):
    p, _ = model
    tokens = np.arange(256, dtype=np.int32) % CFG.vocab_size
    broken = p.replace(embed=p.embed.at[3].set(jnp.nan))  # (a flax struct dataclass)
    with pytest.raises(ValueError, match="the quantized model's ppl .* is nan.*no result"):
        evaluate_models(
            {"quantized": broken}, p, CFG, tokens, seq_len=64, max_chunks=2, progress=False
        )
    with pytest.raises(ValueError, match="perplexity is NaN"):
        ev.evaluate(broken, CFG, tokens, seq_len=64, max_chunks=2, progress=False)
    with pytest.raises(ValueError, match="float model's kl on x is inf"):
        check_finite_scores({"float": {"ppl": 1.0, "kl": math.inf, "tokens": 3}}, "x")


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    """The tiny Llama with 100 embedding rows and the 300-token tokenizer: ids past the
    vocabulary."""
    from converters import save_hf_dir

    cfg = config().replace(vocab_size=100)
    d = tmp_path_factory.mktemp("hf") / "small-vocab"
    return save_hf_dir(cfg, params(cfg), d, tokenizer=tokenizer())


@pytest.mark.parametrize("cmd", ["eval", "quantize"])
def test_cli_refuses_ids_past_the_vocabulary(small_vocab_dir, tmp_path, capsys, cmd):
    args = ["--seq-len", "64", "--max-chunks", "1", "--json"] if cmd == "eval" else [
        "--method", "rtn", "--calib-tokens", "128", "--calib-seq-len", "64",
        "--out", str(tmp_path / "ck"),
    ]  # fmt: skip
    rc = cli.main([cmd, "--model", str(small_vocab_dir), *args])
    out, err = capsys.readouterr()
    assert rc == 2 and "is outside the model's vocabulary [0, 100)" in err
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith(f"arhq-jax {cmd}: error: ") and "{" not in out
    assert not (tmp_path / "ck").exists()


def test_eval_json_is_never_nan(small_vocab_dir, capsys, monkeypatch):
    """Were a NaN to reach the printer, ``--json`` fails with exit 2 rather than print an
    invalid JSON literal."""
    nan = {"ppl": math.nan, "kl": 0.0, "top1": 1.0, "tokens": 63}
    monkeypatch.setattr(cli, "evaluate_models", lambda *a, **k: {"float": dict(nan)})
    tokens = np.zeros(128, np.int32)  # two chunks of 64: the scores come from the stub above
    monkeypatch.setattr(cli, "load_corpus", lambda *a, **k: type("C", (), {"eval": tokens}))
    rc = cli.main(["eval", "--model", str(small_vocab_dir), "--seq-len", "64", "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and "NaN" not in out and "Out of range float values" in err
    for line in out.splitlines():
        json.loads(line)
