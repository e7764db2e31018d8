"""Bit-identity of the quantized arrays across refactors, on the tests' tiny random Llama.

The digests below were computed by the code before the structural refactor of issue 10 (commit
f59fba3) with ``benchmarks/recipe_digests.py --tiny``: per recipe, the number of leaves of the
quantized ``Params`` and one sha256 over the per-leaf sha256 of dtype, shape and bytes. A change
that moves a single bit of any quantized array of these recipes fails here; a deliberate
numerical change must update them (and say so).

The three ARHQ digests were regenerated once since: the gram solver of issue 11 (one Cholesky
factor per shared G, the top-r split from the eigh of the smaller Gram matrix) moves their last
bits; tests/decomposition/test_decompose.py holds it to the reference eigh path (objective within 1e-4
relative, branch within 1e-4·‖W‖). Every other recipe is unchanged from f59fba3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.recipe_digests import TINY_RECIPES, combined, recipe_digests  # noqa: E402

# recipe → (leaves, combined sha256): the pre-refactor code's (ARHQ: the gram solver's).
EXPECTED = {
    "rtn": (62, "4e289381050579ba830645c53fc4b1111a827f5f3d1fc161a5ef92998425a599"),
    "svdquant-r32": (90, "62ec55d90a4e1d5a872d4ccedcc7967f95dfe504e24af3a49b63b3b141e6d313"),
    "arhq-r32-raw": (90, "6738564ddaa0cef840625b8b0b956c08afa86606af1037c0b490fe529897fff2"),
    "arhq-r32-smooth": (104, "6bb927d992ddc40839713f76caaa990f0c5966a6eeea03a86513247e30d55f13"),
    "gptq": (48, "945592d777d30583d14e6dbb20c5d2ec0e071e6eea78c15b5f293ea0e6f4c763"),
    "awq": (96, "f133bf83c7dfa5823c643d23d8a9da43b081b2d5fe176c128d35085dc0c47943"),
    "serq": (118, "7b90ffe22284fdebbfa794e62298b74b65750f0cca00951e2ad9c9eef5359881"),
    "resq": (87, "a1e44b6afaa0ae4f664132dbeb10c8f799f953a2a2f020d88e368668ebbafa34"),
    "svdquant-r8-gptq-int4": (
        76,
        "fb82efd7fc50ec8f033b8c1729c9ce879aee8fe0d301dcb9ad6a4f4ba9f9343b",
    ),
    "gptq-act-order-g32": (48, "28a1dda7fa26ef08b4589880d2d2f1ad2c1025c23321be6a2586fbbd554d5a91"),
    "smoothquant": (48, "bd6c7b8cf79f2f5f2b52bc8ea0c46270cf4ed1fd0d3b72908a35e3c359a0a8c8"),
    "awq-dh": (96, "f133bf83c7dfa5823c643d23d8a9da43b081b2d5fe176c128d35085dc0c47943"),
    "serq-int4": (118, "887cbd205c54ab485d8f2b51e9c9597e90752cb799865de99ee80693da6ab124"),
    "arhq-r8-mxfp4-dyn-seq": (
        76,
        "c7ca8798bec3032dd3b5f40638ce351f3af099bcefbf25dd802901ba1ca86d05",
    ),
}


def test_every_recipe_has_an_expected_digest():
    assert set(EXPECTED) == set(TINY_RECIPES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quantized_arrays_are_bit_identical(model, name):
    from _tiny import CFG

    params, ids = model
    digests = recipe_digests(params, CFG, ids, {name: TINY_RECIPES[name]})[name]
    assert (len(digests), combined(digests)) == EXPECTED[name]
