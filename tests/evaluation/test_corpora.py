"""WikiText-2 / C4 token streams as GPTQ's datautils.py builds them, from local files only.

The files written here mimic the datasets' layouts (the hub's parquet for WikiText-2, C4's gzipped
JSON lines); the online path is checked with ``datasets.load_dataset`` replaced by a stub, so
nothing downloads.
"""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from arhq_jax.evaluation import corpora


class WordTokenizer:
    """Token ids parsed from words ``"<id>"``: windows are recognisable by their ids."""

    def __call__(self, text):
        return {"input_ids": [int(w) for w in text.split()]}


def _doc(d: int, n: int) -> str:
    return " ".join(str(d * 10_000 + k) for k in range(n))


def _gptq_c4_reference(tokenizer, docs, seqlen, nsamples):
    """GPTQ's get_c4 validation loop, as written there (global ``random``)."""
    random.seed(0)
    valenc = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            tmp = tokenizer(docs[i])["input_ids"]
            if len(tmp) >= seqlen:
                break
        i = random.randint(0, len(tmp) - seqlen - 1)
        valenc.append(tmp[i : i + seqlen])
    return np.concatenate(valenc)


def test_c4_windows_follow_gptq_draws():
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(5, 120, size=60)]
    lengths = [n if n != 32 else 33 for n in lengths]  # GPTQ itself fails on n == seqlen
    docs = [_doc(d, n) for d, n in enumerate(lengths)]
    tok = WordTokenizer()
    got = corpora.c4_windows(tok, docs, seq_len=32, n_samples=20)
    ref = _gptq_c4_reference(tok, docs, 32, 20)
    assert got.dtype == np.int32 and got.shape == (20 * 32,)
    np.testing.assert_array_equal(got, ref)
    # every window is 32 consecutive tokens of one document of >= 32 tokens
    for w in got.reshape(20, 32):
        d = int(w[0]) // 10_000
        assert lengths[d] >= 32 and np.all(np.diff(w) == 1)


def test_c4_windows_errors():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="no document tokenizes to 32"):
        corpora.c4_windows(tok, [_doc(0, 5), _doc(1, 9)], seq_len=32, n_samples=2)
    # a document of exactly seq_len tokens is its own window
    np.testing.assert_array_equal(
        corpora.c4_windows(tok, [_doc(0, 8)], seq_len=8, n_samples=1), np.arange(8)
    )


ROWS = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : ... \n", " x \n"]


def test_read_rows_of_each_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ROWS}), tmp_path / "test-00000-of-00001.parquet")
    assert corpora.read_rows(tmp_path / "test-00000-of-00001.parquet") == ROWS
    recs = [{"text": r, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"} for r in ROWS]
    with gzip.open(tmp_path / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    assert corpora.read_rows(tmp_path / "c4-validation.00000-of-00008.json.gz") == ROWS
    (tmp_path / "rows.json").write_text(json.dumps(recs))
    assert corpora.read_rows(tmp_path / "rows.json") == ROWS
    (tmp_path / "docs.txt").write_text("a b\nc\n")
    assert corpora.read_rows(tmp_path / "docs.txt") == ["a b", "c"]


def test_read_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        corpora.read_rows(tmp_path / "missing.parquet")
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="unknown dataset file type"):
        corpora.read_rows(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="record 0 has no 'text' field"):
        corpora.read_rows(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        corpora.read_rows(tmp_path / "c.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable parquet"):
        corpora.read_rows(tmp_path / "d.parquet")


def test_wikitext2_text_joins_rows_like_gptq(tmp_path):
    (tmp_path / "w.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in ROWS))
    assert corpora.wikitext2_text(tmp_path / "w.jsonl") == "\n\n".join(ROWS)
    (tmp_path / "joined.txt").write_text("already joined\n\ntext")
    assert corpora.wikitext2_text(tmp_path / "joined.txt") == "already joined\n\ntext"


def test_online_path_asks_datasets_for_the_protocol_splits(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None, *, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        return {"text": ROWS if path == "Salesforce/wikitext" else [_doc(0, 40), _doc(1, 50)]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert corpora.wikitext2_text() == "\n\n".join(ROWS)
    docs = corpora.c4_documents()
    shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None),
        ("allenai/c4", None, "validation", shard),
    ]
    ids = corpora.dataset_tokens("c4", WordTokenizer(), seq_len=16)
    assert ids.shape == (256 * 16,)
    np.testing.assert_array_equal(ids, _gptq_c4_reference(WordTokenizer(), docs, 16, 256))

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"wikitext2: could not load .*Couldn't reach.*data-file"):
        corpora.wikitext2_text()


def test_dataset_tokens_rejects_unknown():
    with pytest.raises(ValueError, match="unknown dataset 'ptb'"):
        corpora.dataset_tokens("ptb", WordTokenizer())


@pytest.mark.slow
def test_cli_eval_on_a_local_wikitext2_copy(smollm2, tmp_path, capsys):
    """``arhq-jax eval --dataset wikitext2 --data-file`` = eval.evaluate on the joined rows."""
    import jax
    import pyarrow as pa
    import pyarrow.parquet as pq

    from arhq_jax.cli.main import main
    from arhq_jax.evaluation import metrics as ev
    from arhq_jax.models.config import ModelConfig
    from arhq_jax.models.params import random_params
    from converters import save_hf_dir

    cfg = ModelConfig(
        family="llama", vocab_size=smollm2.cfg.vocab_size, hidden_size=64,
        intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True,
    )  # fmt: skip
    params = random_params(cfg, jax.random.key(3), std=0.1)
    save_hf_dir(cfg, params, tmp_path / "tiny", tokenizer=smollm2.tokenizer)
    rows = ev.pydoc_corpus().split("\n")[:400]
    pq.write_table(pa.table({"text": rows}), tmp_path / "test.parquet")
    argv = ["eval", "--model", str(tmp_path / "tiny"), "--dataset", "wikitext2",
            "--data-file", str(tmp_path / "test.parquet"), "--seq-len", "64", "--json"]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = np.asarray(smollm2.tokenizer("\n\n".join(rows))["input_ids"], np.int32)
    ref = ev.evaluate(params, cfg, ids, seq_len=64, progress=False)
    assert got["tokens"] == ref.n_predictions == (len(ids) // 64) * 63  # all chunks, no limit
    assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-5)
    # c4 from a local gzipped JSON-lines shard: 256 windows of --seq-len, all evaluated
    docs = [p for p in ev.pydoc_corpus().split("\n\n") if len(p) > 400][:300]
    with gzip.open(tmp_path / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs))
    argv = ["eval", "--model", str(tmp_path / "tiny"), "--dataset", "c4", "--data-file",
            str(tmp_path / "c4-validation.00000-of-00008.json.gz"), "--seq-len", "64",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    c4 = corpora.c4_windows(smollm2.tokenizer, docs, seq_len=64)
    ref = ev.evaluate(params, cfg, c4, seq_len=64, batch_size=8, progress=False)
    assert got["tokens"] == ref.n_predictions == 256 * 63
    assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-5)
    bad = ["eval", "--model", str(tmp_path / "tiny"), "--dataset", "c4", "--text", "x.txt"]
    assert main(bad) == 2
    assert "not both" in capsys.readouterr().err
