"""Recipe files (``run/recipe_file.py``): keys as ``quantize``'s flags, one-line errors naming the
key, the resolved recipe round-trips to the same ``QuantConfig``, and the CLI's precedence
(explicit flags over the recipe over the defaults). No model runs here; the byte-for-byte
checkpoints are tests/test_api.py's."""

from __future__ import annotations

import pytest

import arhq_jax.run.recipe_file as rf
from arhq_jax.cli.main import _given as given_flags
from arhq_jax.cli.main import build_parser, quantize_recipe
from arhq_jax.run.config import PRESETS, QuantConfig, preset


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_recipe_file_is_the_flags_it_names(tmp_path):
    p = _write(
        tmp_path,
        "method: svdquant\nrank: 16\nformat: nvfp4\nact-format: none\ncalib-tokens: 4096\n"
        "residual_quant: gptq\nmse-clip: true\ngroup-size: null\n",
    )
    r = rf.read_recipe(p)
    assert r == {
        "method": "svdquant",
        "rank": 16,
        "format": "nvfp4",
        "act_format": None,
        "calib_tokens": 4096,
        "residual_quant": "gptq",
        "mse_clip": True,
    }
    argv = ["quantize", "--method", "svdquant", "--rank", "16", "--act-format", "none"]
    argv += ["--residual-quant", "gptq", "--mse-clip", "--out", "x"]
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    assert rf.quant_config(r) == rf.quant_config(quantize_recipe(args))
    assert rf.quant_config(r) == QuantConfig(
        method="svdquant", rank=16, act_fmt=None, residual_quant="gptq", mse_clip=True
    )


@pytest.mark.parametrize(
    "text, needle",
    [
        ("rnak: 8\n", "unknown key 'rnak'"),
        ("rank: -1\n", "key 'rank': must be >= 0, got -1"),
        ("rank: eight\n", "key 'rank': expected an integer, got 'eight'"),
        ("rank: true\n", "key 'rank': expected a number, got True"),
        ("format: nvfp5\n", "key 'format': expected one of default, nvfp4"),
        ("act-format: fp8\n", "key 'act-format': expected one of default, nvfp4"),
        ("sequential: 1\n", "key 'sequential': expected true or false, got 1"),
        ("calib-tokens: 0\n", "key 'calib-tokens': must be >= 1, got 0"),
        ("calib-seq-len: 1\n", "key 'calib-seq-len': must be >= 2, got 1"),
        ("group-size: 0\n", "key 'group-size': expected an int in [1, 1048576], -1 or 'row'"),
        ("preset: best\n", "key 'preset': expected one of best-w4a4"),
        ("ignore: layers.0.*\n", "key 'ignore': ignore must be a list of module name patterns"),
        (
            "overrides: [{match: x, fmt: mxfp4}]\n",
            "key 'overrides': overrides[0]: unknown key 'fmt'",
        ),
        ("overrides: [{match: x, format: fp8}]\n", "unknown overrides[0].format 'fp8'"),
        ("- rank: 8\n", "expected a mapping of settings, got list"),
        ("rank: [\n", "is not valid YAML"),
        ("!!python/object:os.system {}\n", "is not valid YAML"),  # safe_load: no tags
        ("rank: 8\nrank: 4\n", None),  # YAML's own: the last wins (documented)
        ("calib-dataset: a.txt\ncalib-text: b.txt\n", "give calib-dataset or calib-text"),
        ("rank: .inf\n", "expected a finite number"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_key(tmp_path, text, needle):
    p = _write(tmp_path, text)
    if needle is None:
        assert rf.read_recipe(p) == {"rank": 4}
        return
    with pytest.raises(ValueError) as e:
        rf.read_recipe(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"recipe {p}"), msg
    assert needle in msg, msg


def test_missing_or_binary_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        rf.read_recipe(tmp_path / "none.yaml")
    with pytest.raises(IsADirectoryError):
        rf.read_recipe(tmp_path)
    p = tmp_path / "b.yaml"
    p.write_bytes(b"rank: \xff\n")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        rf.read_recipe(p)
    assert rf.read_recipe(_write(tmp_path, "# nothing\n", "e.yaml")) == {}


CONFIGS = [
    QuantConfig(),
    QuantConfig(method="rtn", act_fmt=None),
    QuantConfig(method="arhq", setting="smooth", alpha_tokens=1024, rank=8),
    QuantConfig(method="gptq"),
    QuantConfig(method="awq"),
    QuantConfig(method="smoothquant"),
    QuantConfig(method="serq"),
    QuantConfig(method="svdquant", w_fmt="mxfp4", act_fmt="mxfp4", factor_dtype="bfloat16"),
    QuantConfig(method="rtn", w_fmt="int4", group_size=-1, act_fmt="int8", act_group_size=-1),
    QuantConfig(method="arhq", act_scale="dynamic", rel_eps=1e-4),
    QuantConfig(
        method="arhq",
        ignore=["layers.0.*"],
        overrides=[{"match": "*.down_proj", "format": "mxfp4"}],
    ),
    *[preset(n) for n in PRESETS],
]


@pytest.mark.parametrize("q", CONFIGS, ids=lambda q: q.label())
def test_the_resolved_recipe_round_trips_through_yaml(tmp_path, q):
    r = rf.resolved_recipe(q, {"calib_dataset": "a.txt", "chat_template": True})
    p = tmp_path / "saved.yaml"
    rf.write_recipe(p, r, "made by a test")
    assert p.read_text().startswith("# made by a test\n")
    back = rf.read_recipe(p)
    assert rf.quant_config(back) == q
    assert back["calib_dataset"] == "a.txt" and back["chat_template"] is True
    assert back["calib_tokens"] == 16384 and back["batch_size"] == 8
    with pytest.raises(FileExistsError, match="exists; give a new file name"):
        rf.write_recipe(p, r)  # never replaces a file


def test_a_preset_in_a_recipe_takes_the_other_keys_as_overrides(tmp_path):
    r = rf.read_recipe(_write(tmp_path, "preset: best-w4a4\nrank: 16\n"))
    assert rf.quant_config(r) == preset("best-w4a4", rank=16)
    assert rf.quant_config({"preset": "best-w4a4"}) == preset("best-w4a4")


def _cli_recipe(argv):
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    return quantize_recipe(args)


def test_explicit_flags_override_the_recipe_and_defaults_do_not(tmp_path):
    p = _write(
        tmp_path,
        "method: svdquant\nrank: 8\ncalib-tokens: 2048\nbatch-size: 4\ncalib-text: a.txt\n",
    )
    r = _cli_recipe(["quantize", "--recipe", str(p), "--rank", "4", "--out", "o"])
    # --rank given: it wins; --calib-tokens / --batch-size / --method left at their parser
    # defaults: the recipe's values stand
    assert r == {
        "method": "svdquant",
        "rank": 4,
        "calib_tokens": 2048,
        "batch_size": 4,
        "calib_text": "a.txt",
    }
    # a flag given with its default value still overrides
    r = _cli_recipe(["quantize", "--recipe", str(p), "--calib-tokens", "16384", "--out", "o"])
    assert r["calib_tokens"] == 16384 and r["rank"] == 8
    # an explicit calibration source replaces the recipe's
    r = _cli_recipe(["quantize", "--recipe", str(p), "--calib-dataset", "b.jsonl", "--out", "o"])
    assert r["calib_dataset"] == "b.jsonl" and "calib_text" not in r
    with pytest.raises(ValueError, match="give --calib-text or --calib-dataset, not both"):
        _cli_recipe(["quantize", "--calib-text", "a", "--calib-dataset", "b.txt", "--out", "o"])
    # without a recipe the flags are the recipe
    r = _cli_recipe(["quantize", "--preset", "best-w4a4", "--rank", "16", "--out", "o"])
    assert rf.quant_config(r) == preset("best-w4a4", rank=16)


def test_ignore_and_overrides_are_checked(tmp_path):
    with pytest.raises(ValueError, match="ignore/overrides apply to rtn, svdquant, arhq, gptq"):
        QuantConfig(method="awq", ignore=["layers.0.*"])
    with pytest.raises(ValueError, match="not to arhq-r32-budget"):
        QuantConfig(method="arhq", rank_budget=True, ignore=["*.q_proj"])
    q = QuantConfig(
        method="arhq",
        ignore=["model.layers.1.self_attn.q_proj"],
        overrides=[{"match": "layers.*.mlp.*", "format": "mxfp4"}, ("*.down_proj", "nvfp4")],
    )
    assert q.module_recipe(1, "q_proj") is None
    assert q.module_recipe(0, "q_proj") is q
    assert q.module_recipe(0, "gate_proj").w_fmt == "mxfp4"
    assert q.module_recipe(0, "gate_proj").fused_w_scale is False  # nvfp4 only
    assert q.module_recipe(0, "down_proj") is q  # the last match wins
    parts = q.split_projections(1, ["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"])
    assert [(p.w_fmt, ps) for p, ps in parts] == [
        ("nvfp4", ["k_proj", "down_proj"]),
        ("mxfp4", ["gate_proj", "up_proj"]),
    ]
    from _tiny import CFG

    with pytest.raises(ValueError, match=r"ignore\[0\] 'layers.9.\*' matches none of the"):
        QuantConfig(ignore=["layers.9.*"]).check_model(CFG)
    QuantConfig(ignore=["layers.0.*"]).check_model(CFG)
