"""Names read from files, resolved inside one directory and nowhere else.

A model or checkpoint directory names its own files (a safetensors index's ``weight_map``, a
manifest). Such a name must be a plain relative name: not absolute, no ``..``, no empty part;
and the file it names, once symlinks are resolved, must lie inside the directory.
``inside(d, name)`` checks both and returns the path, or raises ``PathEscapeError`` (a
ValueError) naming the problem. The checkpoint loader and the model converters share it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


class PathEscapeError(ValueError):
    """A name read from a file that is not a plain name inside its directory."""


def plain_name(name, where: str = "", *, nested: bool = False) -> str:
    """``name`` when it is a plain relative file name, else ``PathEscapeError``.

    ``nested``: allow ``a/b`` (each part plain); otherwise one path component only.
    """
    pre = f"{where}: " if where else ""
    if not isinstance(name, str) or not name:
        raise PathEscapeError(f"{pre}file name must be a non-empty string, got {name!r}")
    p = PurePosixPath(name)
    bad = (
        p.is_absolute()
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
        or (not nested and len(p.parts) != 1)
    )
    if bad:
        raise PathEscapeError(f"{pre}{name!r} is not a plain file name inside the directory")
    return name


def inside(d, name, where: str = "", *, nested: bool = False, allow_link=None) -> Path:
    """``d / name`` after checking that ``name`` is plain and that the resolved file lies in ``d``.

    Symlinks are followed only to check where they lead: one whose target leaves ``d`` is
    refused, unless ``allow_link(resolved_target)`` says yes (the Hugging Face cache's
    ``snapshots/<rev>/file -> ../../blobs/<sha>``: ``hf_cache_link``). The file need not exist.
    """
    plain_name(name, where, nested=nested)
    d = Path(d)
    p = d / name
    root = Path(os.path.realpath(d))
    real = Path(os.path.realpath(p))
    if real != root and root not in real.parents:
        if allow_link is None or not allow_link(d, real):
            pre = f"{where}: " if where else ""
            raise PathEscapeError(f"{pre}{p} leads outside {d} (to {real}); refused")
    return p


def hf_cache_link(d: Path, real: Path) -> bool:
    """Whether ``real`` is a blob of the Hugging Face cache that snapshot directory ``d`` belongs
    to (``<repo>/snapshots/<rev>`` → ``<repo>/blobs/<file>``)."""
    snap = Path(os.path.realpath(d))
    return snap.parent.name == "snapshots" and real.parent == snap.parent.parent / "blobs"


def links_in(d) -> list[str]:
    """Relative names of every symlink under ``d`` (not followed), sorted."""
    d = Path(d)
    out = []
    for root, dirs, files in os.walk(d, followlinks=False):
        for n in dirs + files:
            p = Path(root) / n
            if p.is_symlink():
                out.append(str(p.relative_to(d)))
    return sorted(out)


def files_in(d) -> list[str]:
    """Relative names of every entry under ``d`` that is not a directory (regular files,
    symlinks, FIFOs…), without following symlinks; sorted."""
    d = Path(d)
    out = []
    for root, dirs, files in os.walk(d, followlinks=False):
        out += [str((Path(root) / n).relative_to(d)) for n in files]
        out += [str((Path(root) / n).relative_to(d)) for n in dirs if (Path(root) / n).is_symlink()]
    return sorted(out)
