"""The lm-eval backend ``arhq-jax`` against lm-eval's own ``hf`` backend, on SmolLM2, offline.

The task is a local multiple-choice task in lm-eval's own YAML (``dataset_path: json`` with a
JSON file written here); the ``hf`` backend runs transformers on the same weights converted with
``arhq-jax convert smollm2 <tmp>/hf``. Tolerance of the per-request loglikelihoods: 5e-4 nats
absolute. Both sides are f32 and differ only in summation order (XLA vs torch's BLAS): measured
|Δ| ≤ 6e-5 nats (relative ≤ 5e-6) over the 80 requests, so the bound has a ~10× margin and is
still far below the gaps that decide a choice; accuracies must be identical.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in a test
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402

from arhq_jax.cli.main import main  # noqa: E402
from arhq_jax.evaluation import lm_eval_backend as leb  # noqa: E402
from arhq_jax.evaluation import metrics as ev  # noqa: E402
from arhq_jax.models.generate import generate  # noqa: E402
from arhq_jax.run.config import QuantConfig  # noqa: E402
from arhq_jax.run.quantize import quantize_model  # noqa: E402

TASK = "arhq_tiny_mc"
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("Canada", "Ottawa"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("up", "down"),
    ("big", "small"),
    ("fast", "slow"),
    ("day", "night"),
    ("happy", "sad"),
    ("open", "closed"),
    ("early", "late"),
]


def _items() -> list[dict]:
    """24 items, 3–4 choices each (80 loglikelihood requests), the answer at varying places."""
    items = []
    for k, (country, cap) in enumerate(CAPITALS):
        ch = [c for _, c in CAPITALS if c != cap][k % 5 : k % 5 + 3]
        ch.insert(k % 4, cap)
        items.append({"question": f"The capital of {country} is", "choices": ch, "answer": k % 4})
    for k, (a, b) in enumerate(OPPOSITES):
        ch = [o for _, o in OPPOSITES if o != b][k % 4 : k % 4 + 2]
        ch.insert(k % 3, b)
        items.append({"question": f"The opposite of {a} is", "choices": ch, "answer": k % 3})
    for k in range(8):
        a, b = 2 + k, 3 + 2 * k
        ch = [str(a + b + 1), str(a + b - 1)]
        ch.insert(k % 3, str(a + b))
        q = f"Question: {a} + {b} =\nAnswer:"
        items.append({"question": q, "choices": ch, "answer": k % 3})
    for it in items:
        it["choices"] = [" " + c for c in it["choices"]]
    return items


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A directory with the task's YAML and its JSON data file (lm-eval's ``--include_path``)."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "items.json").write_text(json.dumps(_items()))
    (d / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {d / 'items.json'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return d


def _run(model, model_args, task_dir, **kw) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        **kw,
    )


def _per_request(res) -> dict:
    """``{(doc_id, choice): (loglikelihood, is_greedy)}`` from lm-eval's logged samples."""
    out = {}
    for s in res["samples"][TASK]:
        for j, r in enumerate(s["resps"]):
            out[s["doc_id"], j] = (float(r[0][0]), bool(r[0][1]))
    return out


def test_registered_under_its_name_on_import():
    from lm_eval.api.registry import get_model

    import arhq_jax  # noqa: F401

    assert get_model("arhq-jax") is leb.ArhqJaxLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own table still resolves


def test_import_registers_a_lazy_placeholder_in_a_fresh_interpreter():
    """``import arhq_jax`` alone makes the name resolvable; the backend loads on first use."""
    import subprocess
    import sys

    code = (
        "import sys, arhq_jax\n"
        "from lm_eval.api.registry import get_model\n"
        "assert 'arhq_jax.evaluation.lm_eval_backend' not in sys.modules\n"
        "cls = get_model('arhq-jax')\n"
        "assert cls.__module__ == 'arhq_jax.evaluation.lm_eval_backend', cls\n"
        "assert get_model('hf').__name__ == 'HFLM'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_bucket_length():
    assert [leb.bucket_length(n, 8192) for n in (1, 16, 17, 200, 257, 600)] == [
        16,
        16,
        32,
        256,
        512,
        768,
    ]
    assert leb.bucket_length(100, 64) == 100  # never below n, capped at max_len otherwise
    assert leb.bucket_length(40, 48) == 48


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def hf_dir(smollm2, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "smollm2"
    assert main(["convert", "smollm2", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def hf_lm(hf_dir):
    """lm-eval's own ``hf`` backend (transformers, f32, CPU) on the converted directory."""
    from lm_eval.api.registry import get_model

    return get_model("hf")(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def backend(smollm2):
    return leb.ArhqJaxLM.from_params(smollm2.params, smollm2.cfg, smollm2.tokenizer, batch_size=8)


@pytest.mark.slow
def test_loglikelihoods_and_accuracies_equal_the_hf_backend(backend, hf_lm, task_dir):
    ours = _run(backend, None, task_dir)
    theirs = _run(hf_lm, None, task_dir)
    a, b = _per_request(ours), _per_request(theirs)
    assert len(a) == len(b) == 80 and a.keys() == b.keys()
    diffs = np.array([a[k][0] - b[k][0] for k in a])
    assert np.abs(diffs).max() <= 5e-4, np.abs(diffs).max()
    assert [a[k][1] for k in a] == [b[k][1] for k in a]  # greedy flags
    ra, rb = ours["results"][TASK], theirs["results"][TASK]
    assert ra["acc,none"] == rb["acc,none"] and ra["acc_norm,none"] == rb["acc_norm,none"]
    assert 0.4 < ra["acc,none"] < 1.0  # a real model on real questions: better than chance


def _windows_reference(ids: np.ndarray, prefix: int, length: int) -> np.ndarray:
    """The rolling windows as ``[m, length + 1]`` token rows (for T = m·length tokens): row 0 is
    the prefix token and the first ``length`` tokens, row k the ``length + 1`` tokens ending at
    ``(k+1)·length``; each row's ``length`` next-token predictions are that window's score."""
    m = len(ids) // length
    assert m * length == len(ids)
    rows = [np.concatenate([[prefix], ids[:length]])]
    rows += [ids[k * length - 1 : (k + 1) * length] for k in range(1, m)]
    return np.stack(rows).astype(np.int32)


@pytest.mark.slow
def test_rolling_loglikelihood_equals_the_perplexity_path(smollm2):
    tok, length = smollm2.tokenizer, 48
    lm = leb.ArhqJaxLM.from_params(
        smollm2.params, smollm2.cfg, tok, batch_size=2, max_length=length
    )
    ids = ev.split_tokens(ev.load_text_tokens(tok))[1]
    for n in range(3 * length, 3 * length + 40 * length, length):  # a prefix that re-encodes
        text = tok.decode(ids[:n])
        if tok(text)["input_ids"] == list(ids[:n]):
            break
    else:
        pytest.fail("no prefix of the corpus re-encodes to itself")
    windows = _windows_reference(ids[:n], lm.prefix_token_id, length)
    ref = ev.evaluate(
        smollm2.params, smollm2.cfg, windows.reshape(-1), seq_len=length + 1, progress=False
    )
    assert ref.n_chunks == n // length and ref.n_predictions == n
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(-ref.nll * n, rel=2e-6)
    # one window: the whole text conditioned on the prefix token, as eval scores it
    short = tok.decode(ids[:20])
    one = np.concatenate([[lm.prefix_token_id], tok(short)["input_ids"]]).astype(np.int32)
    ref1 = ev.evaluate(smollm2.params, smollm2.cfg, one, seq_len=len(one), progress=False)
    (r1,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)])
    assert r1 == pytest.approx(-ref1.nll * (len(one) - 1), rel=2e-6)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village"]


@pytest.mark.slow
def test_generate_until_honours_max_gen_toks_and_stop_sequences(smollm2, monkeypatch):
    tok, cfg = smollm2.tokenizer, smollm2.cfg
    lm = leb.ArhqJaxLM.from_params(smollm2.params, cfg, tok, batch_size=2)  # 2 batches, ragged
    refs = []
    for p in PROMPTS:  # the reference: unbatched greedy generation, no stop strings
        ids = np.asarray(tok(p)["input_ids"], np.int32)
        out = generate(smollm2.params, cfg, ids, 12, eos_token_id=cfg.eos_token_id)
        new = out[len(ids) :]
        assert len(new) == 12 and cfg.eos_token_id not in new
        refs.append(tok.decode(new, skip_special_tokens=True))

    def reqs(kw):
        return [Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(PROMPTS)]

    got = lm.generate_until(reqs({"until": [], "max_gen_toks": 12, "do_sample": False}))
    assert got == refs
    # stop sequences: cut at the first occurrence of any, and generation stops early
    stops = [r[len(r) // 3 : len(r) // 3 + 3] for r in refs]
    assert all(stops)
    steps = []
    real_step = leb.gen.decode_step
    monkeypatch.setattr(leb.gen, "decode_step", lambda *a: steps.append(1) or real_step(*a))
    for ref, stop, p in zip(refs, stops, PROMPTS, strict=True):
        steps.clear()
        kw = {"until": [stop, "\u2603never"], "max_gen_toks": 12, "do_sample": False}
        (g,) = lm.generate_until([Instance("generate_until", {}, (p, kw), 0)])
        assert g == ref.split(stop)[0]
        assert len(steps) < 11  # stopped before the budget (11 decode steps for 12 tokens)
    # a shorter budget is a prefix of the longer one, in tokens
    short = lm.generate_until(reqs({"until": [], "max_gen_toks": 5, "do_sample": False}))
    for s, ref in zip(short, refs, strict=True):
        assert len(tok(s, add_special_tokens=False)["input_ids"]) <= 6 and ref.startswith(s)


@pytest.mark.slow
def test_generate_until_equals_the_hf_backend(backend, hf_lm):
    """Greedy continuations with stop sequences, batched and ragged, as ``hf`` produces them."""
    kw = {"until": [".", "\n\n"], "max_gen_toks": 16, "do_sample": False}
    reqs = [Instance("generate_until", {}, (p, dict(kw)), i) for i, p in enumerate(PROMPTS)]
    ours = backend.generate_until(reqs)
    theirs = hf_lm.generate_until(reqs)
    assert ours == theirs
    assert all("." not in o and "\n\n" not in o for o in ours) and any(ours)


@pytest.mark.slow
def test_memory_budget_splits_batches_and_prefill(smollm2, backend, monkeypatch):
    """Long contexts: fewer rows per forward and a chunked prefill give the same results."""
    reqs = [
        Instance("loglikelihood", {}, (f"The capital of {c} is", f" {cap}"), i)
        for i, (c, cap) in enumerate(CAPITALS[:3])
    ]
    kw = {"until": ["."], "max_gen_toks": 8, "do_sample": False}
    gens = [Instance("generate_until", {}, (p, dict(kw)), i) for i, p in enumerate(PROMPTS)]
    full_ll, full_gen = backend.loglikelihood(reqs), backend.generate_until(gens)
    v = smollm2.cfg.vocab_size
    monkeypatch.setattr(leb, "LOGITS_BUDGET", 16 * v)  # 1 row of 16, prefill chunks of 2
    assert backend.rows_per_call(16) == 1 and backend.rows_per_call(8) == 2
    calls = []
    real_prefill = leb.gen.prefill
    spy = lambda *a, **k: calls.append(1) or real_prefill(*a, **k)  # noqa: E731
    monkeypatch.setattr(leb.gen, "prefill", spy)
    small_ll, small_gen = backend.loglikelihood(reqs), backend.generate_until(gens)
    assert small_gen == full_gen and len(calls) == 8  # one batch of 8 rows, width 16, 8 chunks
    for (a, ga), (b, gb) in zip(small_ll, full_ll, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb


def _two_quantized_layers(smollm2):
    """SmolLM2 with layers 0–1 as packed NVFP4 W4A16 SVDQuant linears (rank 16), rest float."""
    cfg, fp = smollm2.cfg, smollm2.params
    qcfg = QuantConfig(method="svdquant", rank=16, w_fmt="nvfp4", act_fmt=None)
    two = fp.replace(layers=fp.layers[:2])
    q2 = quantize_model(two, cfg.replace(num_layers=2), None, qcfg, progress=False).params
    return fp.replace(layers=q2.layers + fp.layers[2:])


@pytest.mark.slow
def test_quantized_model_on_xla_and_pallas_paths(smollm2, backend):
    from arhq_jax.linears.quantized import with_kernel

    q = _two_quantized_layers(smollm2)
    tok = smollm2.tokenizer
    reqs = [
        Instance("loglikelihood", {}, (f"The capital of {c} is", f" {cap}"), i)
        for i, (c, cap) in enumerate(CAPITALS[:3])
    ]
    xla_lm = leb.ArhqJaxLM.from_params(q, smollm2.cfg, tok, batch_size=4)
    xla = xla_lm.loglikelihood(reqs)
    pq = with_kernel(q, "pallas", interpret=jax.default_backend() != "gpu")
    pallas = leb.ArhqJaxLM.from_params(pq, smollm2.cfg, tok, batch_size=4).loglikelihood(reqs)
    fl = backend.loglikelihood(reqs)
    for (lx, gx), (lp, gp), (lf, _) in zip(xla, pallas, fl, strict=True):
        assert lp == pytest.approx(lx, rel=1e-4, abs=1e-4) and gx == gp
        assert lx != lf  # really the quantized model
        assert abs(lx - lf) < 2.0  # mildly perturbed
    # generation through the quantized linears and the KV cache = unbatched generate()
    prompt = "The capital of France is"
    ids = np.asarray(tok(prompt)["input_ids"], np.int32)
    ref = generate(q, smollm2.cfg, ids, 6, eos_token_id=smollm2.cfg.eos_token_id)[len(ids) :]
    kw = {"until": [], "max_gen_toks": 6, "do_sample": False}
    (g,) = xla_lm.generate_until([Instance("generate_until", {}, (prompt, kw), 0)])
    assert g == tok.decode(ref, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny_quantized(smollm2, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer as a HF dir, and its RTN NVFP4 W4A16
    checkpoint made by ``arhq-jax quantize`` (so the test does not depend on the format)."""
    from _tiny_cli import write_smollm2_tiny_dir

    root = tmp_path_factory.mktemp("tiny")
    write_smollm2_tiny_dir(root / "tiny", smollm2, max_position_embeddings=512)
    argv = ["quantize", "--model", str(root / "tiny"), "--method", "rtn", "--act-format",
            "none", "--calib-tokens", "256", "--calib-seq-len", "128",
            "--out", str(root / "ck")]  # fmt: skip
    assert main(argv) == 0
    return root / "tiny", root / "ck"


@pytest.mark.slow
def test_cli_lm_eval_writes_results_beside_the_checkpoint(tiny_quantized, task_dir, capsys):
    model, ck = tiny_quantized
    argv = ["lm-eval", "--model", str(model), "--quantized", str(ck), "--tasks", TASK,
            "--include-path", str(task_dir), "--limit", "4", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    out = leb.results_path(ck, [TASK])
    assert out.parent == ck.parent and out.name == f"ck.lm-eval.{TASK}.json"
    doc = json.loads(out.read_text())
    assert doc["arhq_jax"]["quantized"] == str(ck) and doc["arhq_jax"]["written_by"]
    assert doc["n-samples"][TASK]["effective"] == 4
    acc = doc["results"][TASK]["acc,none"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0) and f"{TASK}" in capsys.readouterr().out
    assert main(argv) == 0  # its own file: replaced
    # a file it did not write is never overwritten
    out.write_text('{"mine": 1}')
    assert main(argv) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert out.read_text() == '{"mine": 1}'
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    # the Pallas path (interpret mode on CPU) through the same shell, to an explicit --output
    other = ck.parent / "pallas.json"
    assert main([*argv, "--kernel", "pallas", "--output", str(other)]) == 0
    doc_p = json.loads(other.read_text())
    assert doc_p["arhq_jax"]["kernel"] == "pallas"
    assert doc_p["results"][TASK]["acc,none"] == acc  # W4A16: the two paths agree to ~1e-6


def test_cli_lm_eval_rejects_a_missing_task_dir(tmp_path, capsys):
    rc = main(["lm-eval", "--model", "smollm2", "--tasks", TASK, "--include-path",
               str(tmp_path / "nope"), "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 2 and "task directory not found" in capsys.readouterr().err


def test_model_args_win_over_lm_eval_flags(monkeypatch):
    """``--model_args batch_size=8`` with lm-eval's default ``--batch_size 1``: 8, no collision."""
    from types import SimpleNamespace

    tok = SimpleNamespace(eos_token_id=2, bos_token_id=None, bos_token=None)
    cfg = SimpleNamespace(max_position_embeddings=512)
    seen = []
    monkeypatch.setattr(leb, "load_for_eval", lambda *a: seen.append(a) or (None, cfg, tok))
    lm = leb.ArhqJaxLM.create_from_arg_string(
        "model=m,quantized=q,batch_size=8", {"batch_size": 1, "device": None}
    )
    assert (lm.batch_size, lm.max_length, lm.prefix_token_id) == (8, 512, 2)
    assert seen == [("m", "q", "xla", False)]
    assert leb.ArhqJaxLM.create_from_arg_obj({}, {"batch_size": "4"}).batch_size == 4
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 4096\], got 0"):
        leb.ArhqJaxLM.create_from_arg_string("batch_size=0")


def test_module_runs_as_lm_evals_command_line():
    """``python -m arhq_jax.evaluation.lm_eval_backend`` is lm-eval's CLI with the backend
    registered once."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "arhq_jax.evaluation.lm_eval_backend", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--model_args" in r.stdout


def test_cli_lm_eval_without_lm_eval_installed(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(
        sys.modules, "arhq_jax.evaluation.lm_eval_backend", None
    )  # as if not importable
    assert main(["lm-eval", "--tasks", TASK]) == 2
    assert "pip install arhq-jax[eval]" in capsys.readouterr().err


# ------------------------------------------------------------------ bad --model_args


BAD_MODEL_ARGS = [
    ("foo", "expected key=value, got 'foo'"),
    ("model=m,=3", "expected key=value, got '=3'"),
    ("model=m,model=n", "'model' given twice"),
    ("model=m,bogus=1", "unknown --model_args key(s) 'bogus'"),
    ("model=m,pretrained=gpt2", "unknown --model_args key(s) 'pretrained'"),
    ("model=m,batch_size=abc", "batch_size must be an integer, got 'abc'"),
    ("model=m,batch_size=2.5", "batch_size must be an integer, got 2.5"),
    ("model=m,batch_size=0", "batch_size must be in [1, 4096], got 0"),
    ("model=m,batch_size=1000000000", "batch_size must be in [1, 4096], got 1000000000"),
    ("model=m,kernel=cuda", "unknown kernel 'cuda'"),
    ("model=m,max_length=1", "max_length must be >= 2, got 1"),
    ("model=m,max_gen_toks=-1", "max_gen_toks must be >= 1, got -1"),
    ("model=m,max_batch_size=x", "max_batch_size must be an integer"),
    ("model=m,add_bos_token=maybe", "add_bos_token must be true or false"),
    ("model=m,allow_other_source=2", "allow_other_source must be true or false"),
    ('{"model": [1]}', "model must be a string, got [1]"),
    ('{"model": "m"', "not a JSON object"),
]


@pytest.mark.parametrize(("margs", "needle"), BAD_MODEL_ARGS)
def test_bad_model_args_are_one_line_before_any_load(margs, needle, monkeypatch, capsys):
    """``python -m arhq_jax.evaluation.lm_eval_backend``: exit 2, one ``arhq-jax lm-eval: error``
    line naming the argument, before lm-eval runs or a model loads (both would fail loudly)."""
    import sys

    monkeypatch.setattr(sys, "argv", ["lm_eval_backend"])
    monkeypatch.setattr(leb, "load_for_eval", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        leb.main(["run", "--model", "arhq-jax", "--model_args", margs, "--tasks", TASK])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and err[-1].startswith("arhq-jax lm-eval: error: "), err
    assert needle in err[-1], err
    # The library's entry points raise the same named ValueError (never a TypeError).
    if not margs.startswith("{"):
        with pytest.raises(ValueError, match=re.escape(needle)):
            leb.ArhqJaxLM.create_from_arg_string(margs)


def test_bad_model_args_in_a_real_process():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "arhq_jax.evaluation.lm_eval_backend", "run", "--model", "arhq-jax",
         "--model_args", "model=smollm2,batch_size=abc", "--tasks", TASK],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0] == "arhq-jax lm-eval: error: batch_size must be an integer, got 'abc'"


def test_good_model_args_are_typed(monkeypatch):
    a = leb.check_model_args(leb.parse_model_args("model=m,batch_size=auto:4,max_length=64"))
    assert (a["batch_size"], a["max_length"], a["max_gen_toks"]) == (8, 64, 256)
    a = leb.check_model_args({"batch_size": "16", "add_bos_token": "True", "allow_other_source": 1})
    assert (a["batch_size"], a["add_bos_token"], a["allow_other_source"]) == (16, True, True)
    # lm-eval's own flags beyond the backend's arguments are dropped, not passed on
    seen = []
    monkeypatch.setattr(leb, "load_for_eval", lambda *a: seen.append(a) or pytest.skip("loaded"))
    with pytest.raises(pytest.skip.Exception):
        leb.ArhqJaxLM.create_from_arg_obj({"model": "m"}, {"batch_size": 2, "new_flag": 1})
    assert seen == [("m", None, "xla", False)]


def test_evaluate_tasks_refuses_a_bad_limit_and_unknown_tasks():
    for bad in (-1, 0, float("nan"), "3"):
        with pytest.raises(ValueError, match="limit must be > 0"):
            leb.evaluate_tasks(None, [TASK], limit=bad)
    with pytest.raises(ValueError, match="no lm-eval task given"):
        leb.check_tasks([])
