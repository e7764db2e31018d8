"""QuantConfig: common fields plus the method's options object, routed and validated."""

from __future__ import annotations

import dataclasses

import pytest

from arhq_jax.cli import main as cli
from arhq_jax.methods import REGISTRY
from arhq_jax.methods.lowrank import ARHQOptions
from arhq_jax.run.config import COMMON_FIELDS, QuantConfig, takes


def test_keyword_options_route_into_the_methods_options_object():
    q = QuantConfig(method="arhq", rank=16, eps=1e-5)
    assert q.options == ARHQOptions(rank=16, eps=1e-5)
    assert (q.rank, q.eps, q.setting, q.residual_quant) == (16, 1e-5, "raw", "rtn")
    assert q.alpha is None  # an option of another method reads as None
    assert QuantConfig(method="arhq", options=ARHQOptions(rank=16, eps=1e-5)) == q
    assert q.replace(rank=8).rank == 8 and q.replace(rank=8).eps == 1e-5
    assert q.replace(modules="attn").modules == "attn" and q.replace(modules="attn").rank == 16
    # Defaults are each method's own.
    assert QuantConfig(method="serq").rank == 128 and QuantConfig(method="svdquant").rank == 32
    assert QuantConfig(method="resq").mse_clip and not QuantConfig(method="gptq").mse_clip
    with pytest.raises(AttributeError):
        _ = q.no_such_field


@pytest.mark.parametrize("method", REGISTRY.names())
def test_to_dict_round_trips_and_holds_only_what_applies(method):
    q = QuantConfig(method=method)
    d = q.to_dict()
    assert QuantConfig.from_dict(d) == q
    opts = set(d) - set(COMMON_FIELDS)
    fields = {f.name for f in dataclasses.fields(q.options)}
    assert opts == fields - set(q.options.unused(q))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"method": "arhq", "alpha": 0.3}, "option alpha does not apply to arhq .*smoothquant"),
        ({"method": "arhq", "act_order": True}, "option act_order does not apply to arhq"),
        ({"method": "serq", "percdamp": 0.1}, "option percdamp does not apply to serq"),
        ({"method": "rtn", "rank": 4}, "option rank does not apply to rtn"),
        ({"method": "gptq", "seed": 1}, "option seed does not apply to gptq .*awq, awq-dh, resq"),
        ({"method": "arhq", "nonsense": 1}, "unknown option 'nonsense' for arhq"),
        ({"method": "smoothquant", "alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"method": "gptq", "block_size": 0}, "block_size must be a positive int"),
        ({"method": "arhq", "setting": "wild"}, "unknown setting 'wild'"),
    ],
)
def test_an_option_of_another_method_is_an_error_naming_both(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kw)


def test_options_that_apply_in_the_recipe_are_accepted():
    q = QuantConfig(method="arhq", residual_quant="gptq", act_order=True, percdamp=0.1)
    assert q.act_order and q.percdamp == 0.1
    assert (
        QuantConfig(
            method="serq", w_fmt="int4", act_fmt="int8", residual_quant="gptq", percdamp=0.05
        ).percdamp
        == 0.05
    )
    assert takes("rtn", rank=8, setting="smooth") == {"setting": "smooth"}


def test_cli_rejects_an_unused_option_in_one_line(capsys):
    rc = cli.main(["quantize", "--method", "arhq", "--alpha", "0.3", "--out", "/nonexistent/x"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "alpha does not apply to arhq" in err and len(err.strip().splitlines()) == 1


def test_cli_flags_are_generated_from_the_registered_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = capsys.readouterr().out
    for name, entries in REGISTRY.all_options().items():
        flag = entries[0][1].metadata["cli"].get("flag", "--" + name.replace("_", "-"))
        assert flag in out
    assert "default 32 (svdquant, arhq), 128 (serq)" in " ".join(out.split())
