"""The float reference cache of evaluation: a hit gives the very numbers of the computed
reference without running the float model; a corrupted, truncated or foreign entry is detected,
reported and recomputed; the cache can be turned off and capped."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.evaluation import ref_cache
from arhq_jax.evaluation.pipeline import evaluate_models
from arhq_jax.models.params import random_params

TOKENS = np.arange(64 * 5, dtype=np.int32) * 7 % CFG.vocab_size


def _run(models, ref, root, identity, warns=None, **kw):
    info = {}
    res = evaluate_models(
        models, ref, CFG, TOKENS, seq_len=64, max_chunks=3, batch_size=2, progress=False,
        ref_identity=identity, cache_root=root, warn=None if warns is None else warns.append,
        info=info, **kw,
    )  # fmt: skip
    return res, info["reference"]


@pytest.fixture(scope="module")
def setup(model):
    ref, _ = model
    other = random_params(CFG, jax.random.key(9), std=0.08)  # "the quantized model"
    identity = {"fingerprint": checkpoint.fingerprint(CFG, ref), "dtypes": ["float32"] * 2}
    plain = evaluate_models(
        {"q": other}, ref, CFG, TOKENS, seq_len=64, max_chunks=3, batch_size=2, progress=False
    )
    return ref, other, identity, plain


def test_hit_gives_identical_numbers_without_the_float_model(setup, tmp_path):
    ref, other, identity, plain = setup
    first, how = _run({"q": other}, ref, tmp_path, identity)
    assert how == "computed" and first == plain
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    logits = np.load(tmp_path / files[1])
    assert logits.shape == (3, 64, CFG.vocab_size) and logits.dtype == np.float32
    # A "float model" of garbage under the same identity: the numbers can only come from the cache.
    garbage = jax.tree.map(lambda x: x * 0 + 1, ref)
    second, how = _run({"q": other}, garbage, tmp_path, identity)
    assert how == "cache" and second == plain  # every number bit for bit
    alone, how = _run({}, garbage, tmp_path, identity)
    assert how == "cache" and alone["float"] == plain["float"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda m, n: n.write_bytes(n.read_bytes()[:-7] + b"\0" * 7), "sha256 differs"),
        (lambda m, n: n.write_bytes(n.read_bytes()[:1000]), "unreadable"),
        (lambda m, n: n.unlink(), "logits file is missing"),
        (lambda m, n: m.write_text(m.read_text()[:40]), "unreadable"),
        (
            lambda m, n: m.write_text(json.dumps({**json.loads(m.read_text()), "n_pred": 5})),
            "not an entry of this key",
        ),  # fmt: skip
        (lambda m, n: np.save(n, np.zeros((3, 64, 7), np.float32)), "expected f32[3, 64, 128]"),
    ],
)
def test_damaged_entry_is_detected_and_recomputed(setup, tmp_path, damage, reason):
    ref, other, identity, plain = setup
    _run({"q": other}, ref, tmp_path, identity)
    meta = next(tmp_path.glob("*.json"))
    npy = meta.with_suffix(".npy")
    damage(meta, npy)
    warns = []
    res, how = _run({"q": other}, ref, tmp_path, identity, warns)
    assert how == "computed" and res == plain
    assert len(warns) == 1 and reason in warns[0] and "recomputing" in warns[0], warns
    warns.clear()  # the entry was rewritten: a hit again
    res, how = _run({"q": other}, ref, tmp_path, identity, warns)
    assert how == "cache" and res == plain and warns == []


def test_another_model_or_text_misses(setup, tmp_path):
    ref, other, identity, _ = setup
    _run({"q": other}, ref, tmp_path, identity)
    _, how = _run({"q": other}, ref, tmp_path, {**identity, "dtypes": ["bfloat16"] * 2})
    assert how == "computed"
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_cap_keeps_scores_only(setup, tmp_path, monkeypatch):
    ref, other, identity, plain = setup
    monkeypatch.setenv(ref_cache.ENV_MAX, "1000")
    _, how = _run({}, ref, tmp_path, identity)
    assert how == "computed"
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]
    garbage = jax.tree.map(lambda x: x * 0 + 1, ref)
    alone, how = _run({}, garbage, tmp_path, identity)
    assert how == "cache" and alone["float"] == plain["float"]
    res, how = _run({"q": other}, ref, tmp_path, identity)  # KL needs the logits: recomputed
    assert how == "computed" and res == plain


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(ref_cache.ENV_DIR, str(tmp_path / "c"))
    monkeypatch.delenv(ref_cache.ENV_OFF, raising=False)
    assert ref_cache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv(ref_cache.ENV_OFF, "1")
    assert ref_cache.cache_dir() is None
    monkeypatch.setenv(ref_cache.ENV_OFF, "0")
    monkeypatch.delenv(ref_cache.ENV_DIR)
    assert ref_cache.cache_dir().parts[-2:] == (".cache", "arhq-jax")
    monkeypatch.setenv(ref_cache.ENV_MAX, "lots")
    with pytest.raises(ValueError, match="ARHQ_JAX_CACHE_MAX_BYTES must be a byte count"):
        ref_cache.max_bytes()
