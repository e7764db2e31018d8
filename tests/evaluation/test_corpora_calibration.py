"""Calibration sources of ``quantize --calib-dataset`` (``corpora``'s calibration section): the
spec, each file format against the same text as a plain file, shares, the chat template and the
online-only datasets. The token ids are checked against slices of an independent tokenization;
that the same ids give the same calibration statistics is tests/test_api.py's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arhq_jax.evaluation import corpora
from arhq_jax.evaluation.corpora import CalibSource


class WordTokenizer:
    """Token ids parsed from words ``"<id>"``; any other word is id 0."""

    chat_template = None

    def __call__(self, text):
        return {"input_ids": [int(w) if w.isdigit() else 0 for w in text.split()]}


def _docs(n_docs=6, n=40):
    return [" ".join(str(d * 1000 + k) for k in range(n)) for d in range(n_docs)]


def _write_all(tmp_path, docs):
    """The same documents as a .txt (joined with the documented separator), .jsonl, .json and
    .parquet."""
    txt = tmp_path / "a.txt"
    txt.write_text(corpora.DOC_JOIN.join(docs), encoding="utf-8")
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"text": d} for d in docs]))
    out = {"txt": txt, "jsonl": jl, "json": js}
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / "a.parquet")
    out["parquet"] = tmp_path / "a.parquet"
    return out


def _ids(spec, tok, n_tokens, seq_len, **kw):
    field, chat = kw.pop("field", "text"), kw.pop("chat", False)
    read = [
        (s, corpora.read_calib_documents(s, field, chat)) for s in corpora.parse_calib_sources(spec)
    ]
    return corpora.calibration_from_sources(tok, read, n_tokens, seq_len, chat=chat, **kw)


def test_every_file_format_gives_the_tokens_of_the_plain_text(tmp_path):
    docs = _docs()
    files = _write_all(tmp_path, docs)
    tok = WordTokenizer()
    # the reference: the .txt file tokenized whole, first 3 sequences of 32 (as --calib-text)
    ref = np.asarray(tok(files["txt"].read_text())["input_ids"], np.int32)[: 3 * 32]
    for kind, path in files.items():
        got = _ids(str(path), tok, 100, 32)
        assert got.dtype == np.int32 and got.shape == (3, 32), kind
        np.testing.assert_array_equal(got.reshape(-1), ref, err_msg=kind)


def test_calib_field_names_the_text_column(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps({"prompt": d}) + "\n" for d in _docs(2)))
    got = _ids(str(p), WordTokenizer(), 64, 32, field="prompt")
    np.testing.assert_array_equal(got.reshape(-1)[:40], np.arange(40))
    with pytest.raises(ValueError, match=r"record 0 has no 'text' field"):
        _ids(str(p), WordTokenizer(), 64, 32)


def test_shares_split_the_sequences_and_sources_keep_their_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text(" ".join(str(k) for k in range(400)))
    b.write_text("".join(json.dumps({"text": str(5000 + k)}) + "\n" for k in range(400)))
    tok = WordTokenizer()
    got = _ids(f"{a}:0.75,{b}:0.25", tok, 8 * 16, 16)  # 8 sequences: 6 from a, 2 from b
    np.testing.assert_array_equal(got[:6].reshape(-1), np.arange(96))
    np.testing.assert_array_equal(got[6:].reshape(-1), 5000 + np.arange(32))
    equal = _ids(f"{a},{b}", tok, 7 * 16, 16)  # equal shares: 4 + 3 (the remainder to the first)
    np.testing.assert_array_equal(equal[:4].reshape(-1), np.arange(64))
    np.testing.assert_array_equal(equal[4:].reshape(-1), 5000 + np.arange(48))
    assert corpora.sequence_shares([CalibSource("x", 0.7), CalibSource("y", 0.3)], 10) == [7, 3]
    assert corpora.sequence_shares([CalibSource("x", 2), CalibSource("y", 1)], 4) == [3, 1]


def test_a_short_source_is_named(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(str(k) for k in range(400)))
    b.write_text("1 2 3")
    with pytest.raises(ValueError, match=r"calibration dataset .*b.txt is too short: it has 3"):
        _ids(f"{a},{b}", WordTokenizer(), 4 * 16, 16)
    with pytest.raises(ValueError, match="rounds to 0"):
        _ids(f"{a}:0.99,{b}:0.01", WordTokenizer(), 4 * 16, 16)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("", "expected a name or file"),
        ("a.csv", "give pydoc, wikitext2, c4, docstrings or a .txt/.jsonl/.json/.parquet file"),
        ("a.txt:0.5,b.txt", "a share for every source or none"),
        ("a.txt:0", "the share must be > 0"),
        ("a.txt:-1", "the share must be > 0"),
        ("a.txt,,b.txt", "empty item"),
        ("a.txt,a.txt", "names a source twice"),
        ("wikipedia", "give pydoc, wikitext2, c4"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, needle):
    with pytest.raises(ValueError, match=needle) as e:
        corpora.parse_calib_sources(spec)
    assert "\n" not in str(e.value)


def test_a_colon_in_a_file_name_is_not_a_share(tmp_path):
    assert corpora.parse_calib_sources("dir:x/a.txt") == [CalibSource("dir:x/a.txt")]
    assert corpora.parse_calib_sources("a.txt:2.5") == [CalibSource("a.txt", 2.5)]


def test_bad_records_and_files(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match=r"record 0's 'text' is not a string \(got int\)"):
        _ids(str(p), WordTokenizer(), 32, 16)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        _ids(str(bad), WordTokenizer(), 32, 16)
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        _ids(str(tmp_path / "none.txt"), WordTokenizer(), 32, 16)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(ValueError, match="empty text"):
        _ids(str(blank), WordTokenizer(), 32, 16)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    p = tmp_path / "a.parquet"
    p.write_bytes(b"PAR1")
    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ValueError, match="reading parquet needs pyarrow"):
        _ids(str(p), WordTokenizer(), 32, 16)


def test_chat_template_renders_each_record():
    """A jinja template on a real transformers tokenizer: the ids are those of the rendered
    records joined, as an independent rendering by hand gives them."""
    import _tiny_cli as T

    tok = T.tokenizer()
    assert not getattr(tok, "chat_template", None)
    docs = [
        "def f(x): return x",
        [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A"}],
    ]
    src = CalibSource("mem.jsonl")
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        corpora.source_tokens(tok, src, docs, chat=True)
    tok = T.tokenizer().__class__(tokenizer_object=T.tokenizer().backend_tokenizer)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    got = corpora.source_tokens(tok, src, docs, chat=True)
    by_hand = (
        "<|user|>def f(x): return x\n"
        + corpora.DOC_JOIN
        + "<|user|>What is a list?\n<|assistant|>A\n"
    )
    np.testing.assert_array_equal(got, tok(by_hand)["input_ids"])
    plain = corpora.source_tokens(tok, src, docs[:1], chat=False)
    np.testing.assert_array_equal(plain, tok(docs[0])["input_ids"])


def test_chat_messages_must_be_role_and_content(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat message is not \{'role': str, 'content': str\}"):
        corpora.read_calib_documents(CalibSource(str(p)), "text", chat=True)
    with pytest.raises(ValueError, match="is not a string"):  # a list without --chat-template
        corpora.read_calib_documents(CalibSource(str(p)), "text", chat=False)


def test_wikitext2_and_c4_calibrate_on_their_train_data_online_only(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None, *, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        return {"text": [" ".join(str(k) for k in range(j * 100, j * 100 + 50)) for j in range(3)]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    w = _ids("wikitext2", WordTokenizer(), 64, 16)
    c = _ids("c4", WordTokenizer(), 64, 16)
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", None),
        ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    ]
    np.testing.assert_array_equal(w.reshape(-1), np.r_[np.arange(50), np.arange(100, 114)])
    np.testing.assert_array_equal(c, w)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError) as e:
        _ids("wikitext2", WordTokenizer(), 64, 16)
    msg = str(e.value)
    assert "\n" not in msg and "could not load it through `datasets`" in msg
    assert "--calib-dataset FILE.parquet" in msg


def test_pydoc_source_is_the_default_calibration_part():
    import _tiny_cli as T

    from arhq_jax.evaluation.pipeline import calibration_ids, load_corpus

    tok = T.tokenizer()
    ref = calibration_ids(load_corpus(tok).calib, 512, 64)
    np.testing.assert_array_equal(_ids("pydoc", tok, 512, 64), ref)
    with pytest.raises(ValueError, match="does not apply to the pydoc corpus"):
        _ids("pydoc", tok, 512, 64, chat=True)


def test_docstrings_source_is_the_modules_docstrings_and_no_licence():
    """``docstrings``: one document per listed module, each starting with the module's docstring
    and holding ``name: doc`` of its public members (``inspect.cleandoc`` of ``__doc__``, the
    reference); the same on every call; no 8-word run of the GPL-3 text (the held-out second text
    of the benchmarks) and no licence boilerplate."""
    import inspect
    import json as json_mod
    import textwrap

    assert corpora.parse_calib_sources("pydoc:0.5,docstrings:0.5") == [
        CalibSource("pydoc", 0.5),
        CalibSource("docstrings", 0.5),
    ]
    docs = corpora.read_calib_documents(CalibSource("docstrings"))
    assert docs == corpora.docstrings_corpus()
    assert len(docs) == len(corpora.DOCSTRING_MODULES)
    i = corpora.DOCSTRING_MODULES.index("json")
    assert docs[i].startswith(inspect.cleandoc(json_mod.__doc__))
    assert "dumps: " + inspect.cleandoc(json_mod.dumps.__doc__) in docs[i]
    assert "textwrap" not in docs[i]  # members of other modules are left out
    j = corpora.DOCSTRING_MODULES.index("textwrap")
    assert "dedent: " + inspect.cleandoc(textwrap.dedent.__doc__) in docs[j]
    text = corpora.DOC_JOIN.join(docs)
    assert 300_000 < len(text) < 2_000_000  # ample for a 16k-token share, 4 chars a token
    for word in ("WARRANT", "COPYRIGHT", "RIGHTS RESERVED", "LICENSE", "LICENCE"):
        assert word not in text.upper()

    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.is_file():

        def runs(s):
            w = s.split()
            return {" ".join(w[k : k + 8]) for k in range(len(w) - 7)}

        assert not runs(text) & runs(gpl.read_text(encoding="utf-8"))


class CharTokenizer:
    """One id per character (its code point mod 1000)."""

    chat_template = None

    def __call__(self, text):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_docstrings_source_calibrates_as_its_joined_text():
    docs = corpora.docstrings_corpus()
    tok = CharTokenizer()
    ids = _ids("docstrings", tok, 4 * 16, 16)
    want = np.asarray(tok(corpora.DOC_JOIN.join(docs))["input_ids"][: 4 * 16]).reshape(4, 16)
    np.testing.assert_array_equal(ids, want)
