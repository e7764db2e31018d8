"""Output directories (``arhq_jax.checkpoint.out_dir``): ``--out`` is a literal name checked before
any work, and a directory is replaced only when every byte and every directory in it is ours.

Each case is one a careless or hostile user met: a glob character in the name took another
output's leftover backup; ``/`` and system directories were walked; a name too long for the
sibling work directories failed only at assembly; a foreign directory with a hand-written
manifest (wrong hashes) and an empty user subdirectory inside a checkpoint were deleted on
replace; a pid reused by another process looked alive forever.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
from _tiny import CFG

from arhq_jax.checkpoint import out_dir
from arhq_jax.checkpoint import store as checkpoint
from arhq_jax.models.params import random_params

FMT = checkpoint.FORMAT


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, jax.random.key(0), std=0.08)


@pytest.fixture(scope="module")
def ckpt(params, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "ck"
    checkpoint.save(out, params, CFG)
    return out


def _tree(d):
    """Every path under ``d`` (files and directories) with the bytes of the files."""
    return {
        str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(d.rglob("*"))
    }


def test_out_is_literal_not_a_glob(params, ckpt, tmp_path):
    """``--out 'g/ck*'``: another output's leftover backup and killed-run directory (dead pid)
    match the pattern ``.ck*.arhq-old-*`` / ``.ck*.arhq-tmp-*``; neither is touched."""
    g = tmp_path / "g"
    g.mkdir()
    backup = g / ".ckA.arhq-old-abcd1234"  # a complete checkpoint of ours, output ckA absent
    shutil.copytree(ckpt, backup)
    partial = g / ".ckA.arhq-tmp-abcd1234"
    partial.mkdir()
    (partial / ".arhq-jax-partial").write_text("999999999")
    before = _tree(g)
    checkpoint.save(g / "ck*", params, CFG)
    after = _tree(g)
    assert {k: v for k, v in after.items() if not k.startswith("ck*")} == before
    checkpoint.load(g / "ck*")
    # Its own leftovers, by exact name, are still cleaned up (a dead writer's partial directory).
    own = g / ".ck*.arhq-tmp-abcd1234"
    own.mkdir()
    (own / ".arhq-jax-partial").write_text("999999999")
    checkpoint.save(g / "ck*", params, CFG)
    assert not own.exists() and partial.is_dir() and backup.is_dir()


@pytest.mark.parametrize(
    "target", ["/", "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/boot", "/lib", "/proc/x"]
)
def test_system_directories_are_refused(target):
    with pytest.raises(ValueError, match="root directory|system directory"):
        checkpoint.check_out(target)


@pytest.mark.parametrize("target", [".", "..", "a/..", "a/."])
def test_dot_names_are_refused(target):
    with pytest.raises(ValueError, match="give it a name"):
        out_dir.check_target(target)


def test_name_length_leaves_room_for_the_sibling_directories(params, tmp_path):
    """NAME_MAX 255: the longest sibling name is ``.<name>.arhq-tmp-XXXXXXXX`` (20 bytes more),
    so 235 bytes is the longest name that works end to end, and 236 is refused up front."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = name_max - out_dir.SIBLING_EXTRA
    assert out_dir.SIBLING_EXTRA == len(".") + len(".arhq-tmp-") + 8
    with pytest.raises(ValueError, match=f"is {longest + 1} bytes; at most {longest}"):
        checkpoint.check_out(tmp_path / ("n" * (longest + 1)))
    with pytest.raises(ValueError, match="bytes; at most"):  # bytes, not characters
        checkpoint.check_out(tmp_path / ("é" * ((longest + 2) // 2)))
    checkpoint.save(tmp_path / ("n" * longest), params, CFG)
    checkpoint.load(tmp_path / ("n" * longest))


def test_parent_must_be_a_writable_directory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        checkpoint.check_out(tmp_path / "file" / "ck")
    checkpoint.check_out(tmp_path / "new" / "deeper" / "ck")  # created under a writable one
    # A read-only parent (faked: this suite may run as root, for whom every directory is writable)
    real = os.access
    monkeypatch.setattr(out_dir.os, "access", lambda p, m: False if p == tmp_path else real(p, m))
    with pytest.raises(PermissionError, match="is not writable"):
        checkpoint.check_out(tmp_path / "ck")


def test_a_hand_written_manifest_with_wrong_hashes_is_not_ours(params, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"precious data")
    files = {"data.bin": {"sha256": "0" * 64, "bytes": 13}}
    (foreign / "manifest.json").write_text(
        json.dumps({"format": FMT, "format_version": 2, "files": files})
    )
    before = _tree(foreign)
    with pytest.raises(FileExistsError, match="manifest does not match its files"):
        checkpoint.check_out(foreign)
    with pytest.raises(FileExistsError, match="manifest does not match its files"):
        checkpoint.save(foreign, params, CFG)
    assert _tree(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_a_checkpoint_edited_after_writing_is_not_replaced(params, ckpt, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(ckpt, own)
    checkpoint.save(own, params, CFG)  # ours, intact: replaced
    cfg = own / "config.json"
    cfg.write_text(cfg.read_text() + " ")  # a user's edit (same files, one byte more)
    before = _tree(own)
    with pytest.raises(FileExistsError, match="does not match"):
        checkpoint.save(own, params, CFG)
    assert _tree(own) == before


@pytest.mark.parametrize("sub", ["notes", "lora/mine", "a/b/c"])
def test_user_subdirectories_are_never_deleted(params, ckpt, tmp_path, sub):
    own = tmp_path / "own"
    shutil.copytree(ckpt, own)
    (own / sub).mkdir(parents=True)  # empty: no file would betray it
    before = _tree(own)
    with pytest.raises(FileExistsError, match="directories arhq-jax did not write"):
        checkpoint.save(own, params, CFG)
    assert _tree(own) == before
    assert (own / sub).is_dir()


def test_the_refusal_comes_before_the_model_loads(tmp_path):
    """In a real process: ``--out /`` and a too-long name are refused in one line, exit 2, while
    the model named does not even exist (so nothing was loaded before the check)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for out, needle in (("/", "root directory"), (str(tmp_path / ("x" * 242)), "NAME_MAX")):
        argv = ["quantize", "--model", str(tmp_path / "no-model"), "--out", out]
        p = subprocess.run(
            [sys.executable, "-m", "arhq_jax.cli.main", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert lines[0].startswith("arhq-jax quantize: error: ") and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_a_reused_pid_is_not_the_recorded_process():
    me = out_dir.this_process()
    assert me[0] == os.getpid()
    if me[1] is None:
        pytest.skip("no /proc/<pid>/stat on this system")
    assert out_dir.pid_alive(*me)
    assert not out_dir.pid_alive(me[0], me[1] + 1)  # same pid, another start: a later process
    assert not out_dir.pid_alive(2**22 + 12345)  # beyond pid_max: no such process
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            start = out_dir.process_start(child.pid)
            assert isinstance(start, int) and start >= me[1]
            assert out_dir.pid_alive(child.pid, start)
            assert not out_dir.pid_alive(child.pid, start - 1)
        finally:
            child.kill()
