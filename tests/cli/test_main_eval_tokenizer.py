"""``arhq-jax eval --quantized DIR`` tokenizes with the tokenizer stored in the checkpoint, as a
consumer of the checkpoint does, whatever tokenizer ``--model`` holds (tiny local models)."""

from __future__ import annotations

import json
import shutil

import _tiny_cli as T

from arhq_jax.cli.main import main


def _other_tokenizer():
    """A byte-level BPE of the same vocabulary size trained on other text (other merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "".join(chr(0x41 + (i * 7919) % 26) + " " * (i % 5 == 0) for i in range(50_000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=T.VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _eval(model, ckpt, capsys) -> dict:
    capsys.readouterr()
    args = ["eval", "--model", str(model), "--quantized", str(ckpt), "--seq-len", "64"]
    assert main([*args, "--max-chunks", "4", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_uses_the_checkpoints_tokenizer(tmp_path, capsys):
    a = T.write_hf_dir(tmp_path / "a")
    ckpt = tmp_path / "ckpt"
    args = ["--method", "rtn", "--calib-seq-len", "64", "--calib-tokens", "256", "--out", str(ckpt)]
    assert main(["quantize", "--model", str(a), *args]) == 0
    b = tmp_path / "b"  # the same weights with another tokenizer
    shutil.copytree(a, b)
    other = _other_tokenizer()
    other.save_pretrained(str(b))
    text = "The quick brown fox jumps over the lazy dog."
    assert other(text)["input_ids"] != T.tokenizer()(text)["input_ids"]  # they do differ
    # the same scores; the line also names the --model given and whether the float reference
    # came from the cache (the second eval's does)
    run = ("model", "float_reference")
    got_b, got_a = (
        {k: v for k, v in r.items() if k not in run}
        for r in (_eval(b, ckpt, capsys), _eval(a, ckpt, capsys))
    )
    assert got_b == got_a
