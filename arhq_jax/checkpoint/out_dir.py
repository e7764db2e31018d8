"""Output directories that never destroy what the program did not write, and their manifest.

``replacing(path, fmt)`` yields a temporary sibling directory to fill; on success it writes
``manifest.json`` (the marker: the format name and the sha256 and size of every file) and renames
the directory into place. ``path`` may be absent, an empty directory, or a directory this
program wrote (a manifest of the same format listing every file in it); anything else is refused
before any work starts, untouched. On failure the temporary directory is removed; one left by a
killed run (its marker names a dead process) is removed by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from arhq_jax.storage.atomic import OLD_INFIX, TMP_INFIX, atomic_dir

MANIFEST = "manifest.json"
_PARTIAL = ".arhq-jax-partial"  # inside a temporary directory: the pid that writes it
_TMP, _OLD = TMP_INFIX, OLD_INFIX


class CheckpointError(ValueError):
    """A checkpoint that is malformed, corrupted, forged or from another model."""


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() or p.is_symlink())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(d: Path, fmt: str, version: int) -> None:
    files = {
        rel: {"sha256": sha256_file(d / rel), "bytes": (d / rel).stat().st_size}
        for rel in _files(d)
        if rel != MANIFEST
    }
    doc = {"format": fmt, "format_version": version, "files": files}
    (d / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_manifest(d: Path, fmt: str) -> dict:
    """``{relative path: {"sha256", "bytes"}}`` of a directory's manifest, validated."""
    f = d / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"not an arhq-jax checkpoint: {f} is missing")
    try:
        doc = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is corrupted: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise CheckpointError(f"{f}: not an {fmt} manifest")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{f}: 'files' must be a JSON object")
    for rel, e in files.items():
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or rel in ("", "."):
            raise CheckpointError(f"{f}: bad file name {rel!r}")
        ok = (
            isinstance(e, dict)
            and set(e) == {"sha256", "bytes"}
            and isinstance(e["sha256"], str)
            and len(e["sha256"]) == 64
            and isinstance(e["bytes"], int)
            and not isinstance(e["bytes"], bool)
        )
        if not ok:
            raise CheckpointError(f"{f}: bad entry for {rel!r}")
    return files


def verify(d: Path, fmt: str) -> dict:
    """Check every file the manifest lists: present, regular, same size, same sha256."""
    files = read_manifest(d, fmt)
    for rel, e in files.items():
        p = d / rel
        if p.is_symlink() or not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != e["bytes"]:
            raise CheckpointError(
                f"{p}: {size} bytes, the manifest says {e['bytes']} (truncated or changed)"
            )
        if sha256_file(p) != e["sha256"]:
            raise CheckpointError(f"{p}: sha256 differs from the manifest (corrupted or changed)")
    return files


def check_replaceable(path: Path, fmt: str) -> None:
    """Raise FileExistsError unless ``path`` is absent, empty, or wholly written by us."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; not overwriting it")
    present = _files(path)
    if not present and not any(path.iterdir()):
        return
    try:
        listed = read_manifest(path, fmt)
    except CheckpointError:
        raise FileExistsError(
            f"{path} is not empty and is not an arhq-jax checkpoint; not replacing it "
            "(choose another output directory)"
        ) from None
    foreign = [f for f in present if f != MANIFEST and f not in listed]
    if foreign:
        raise FileExistsError(
            f"{path} holds files arhq-jax did not write ({', '.join(foreign[:3])}); "
            "not replacing it"
        )


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path, fmt: str) -> None:
    """Remove temporary directories of killed runs beside ``path`` (only ones we marked)."""
    for d in path.parent.glob(f".{path.name}{_TMP}*"):
        marker = d / _PARTIAL
        try:
            pid = int(marker.read_text())
        except (OSError, ValueError):
            continue
        if not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
    for d in path.parent.glob(f".{path.name}{_OLD}*"):
        try:
            read_manifest(d, fmt)
        except CheckpointError:
            continue
        if path.exists():
            shutil.rmtree(d, ignore_errors=True)
        else:  # killed between the two renames: put the previous output back
            os.rename(d, path)


@contextlib.contextmanager
def replacing(path, fmt: str, version: int):
    """Yield a temporary directory that becomes ``path`` (with its manifest) on success."""
    path = Path(path).absolute()
    check_replaceable(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, fmt)
    with atomic_dir(path, lambda: check_replaceable(path, fmt)) as tmp:
        (tmp / _PARTIAL).write_text(str(os.getpid()))
        yield tmp
        (tmp / _PARTIAL).unlink()
        write_manifest(tmp, fmt, version)
