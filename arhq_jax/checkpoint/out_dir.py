"""Output directories that never destroy what the program did not write, and their manifest.

``replacing(path, fmt)`` yields a temporary sibling directory to fill; on success it writes
``manifest.json`` (the marker: the format name and the sha256 and size of every file) and renames
the directory into place. ``path`` is taken literally (never a glob pattern) and checked before
any work (``check_target``): not a system directory, its name short enough for the sibling
names derived from it, its parent a writable directory. It may be absent, an empty directory, or
a directory this program wrote: a manifest of the same format whose every entry matches its file
(size and sha256), every file listed, no other directory than those holding listed files;
anything else is refused before any work starts, untouched. On failure the temporary directory
is removed; one left by a killed run (its marker names a dead process) is removed by the next run.

Every file the program writes is listed, the model card (``README.md``) included, so a user's
edit of it or a file added beside it makes the directory no longer ours: it is refused rather
than replaced, because replacing it would delete the user's work. (Tolerating unlisted files
would not be safe either: the replace removes the old directory as a whole.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from arhq_jax.storage.atomic import OLD_INFIX, TMP_INFIX, atomic_dir

MANIFEST = "manifest.json"
_PARTIAL = ".arhq-jax-partial"  # inside a temporary directory: the pid that writes it
_TMP, _OLD = TMP_INFIX, OLD_INFIX
# tempfile.mkdtemp's random part (8 characters of this alphabet; no dot, so never another
# output's sibling).
_RANDOM = re.compile(r"[a-z0-9_]+")
# Bytes the longest sibling name adds to the output's name: ".<name>.arhq-tmp-XXXXXXXX" (also
# ".<name>.arhq-old-XXXXXXXX" and the resume directory ".<name>.arhq-resume").
SIBLING_EXTRA = 1 + max(len(TMP_INFIX), len(OLD_INFIX)) + 8
# Never an output directory (nor anything inside the pseudo filesystems).
SYSTEM_DIRS = frozenset(
    "/ /bin /boot /dev /etc /home /lib /lib32 /lib64 /libx32 /media /mnt /opt /proc /root /run "
    "/sbin /snap /srv /sys /tmp /usr /usr/bin /usr/lib /usr/local /usr/share /var".split()
)
_PSEUDO = ("/proc", "/sys", "/dev")


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


def check_target(path) -> None:
    """Raise ValueError (or PermissionError) unless ``path`` can name an output directory: not
    ``/`` or a system directory, a name that is not ``.``/``..`` and fits NAME_MAX together with
    the sibling names derived from it (``SIBLING_EXTRA`` bytes more), and a parent that is — or
    will be created under — a writable directory. Cheap: no directory walk."""
    raw = os.fspath(path)
    if os.path.abspath(raw) == "/":
        raise ValueError("output directory '/' is the root directory; refusing it")
    if os.path.basename(raw.rstrip("/")) in ("", ".", ".."):
        raise ValueError(f"output directory {raw!r}: give it a name (not '.' or '..')")
    full = os.path.abspath(raw)
    for p in {full, os.path.realpath(full)}:
        if (
            p in SYSTEM_DIRS
            or p == os.path.expanduser("~")
            or p.startswith(tuple(d + "/" for d in _PSEUDO))
        ):
            raise ValueError(f"output directory {raw!r} is a system directory ({p}); refusing it")
    parent = Path(full).parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"output directory {raw!r}: {ancestor} is not a directory")
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    n = len(os.fsencode(Path(full).name))
    if n + SIBLING_EXTRA > name_max:
        raise ValueError(
            f"output directory name {Path(full).name[:40]!r}... is {n} bytes; at most "
            f"{name_max - SIBLING_EXTRA} (NAME_MAX {name_max} less {SIBLING_EXTRA} for the work "
            "and backup directories beside it)"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {raw!r}: {ancestor} is not writable")


def check_replaceable(path: Path, fmt: str) -> None:
    """Raise unless ``path`` is a valid target (``check_target``: ValueError/OSError) and absent,
    empty, or wholly written by us (else FileExistsError): a manifest of format ``fmt`` that
    matches every file (size, sha256), lists every file, and no directory but the ones holding
    listed files (a user's subdirectory, even an empty one, is never deleted)."""
    check_target(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; not overwriting it")
    if not any(path.iterdir()):
        return
    if not (path / MANIFEST).is_file():  # before any walk: refuse a foreign tree at once
        raise FileExistsError(
            f"{path} is not empty and is not an arhq-jax checkpoint; not replacing it "
            "(choose another output directory)"
        )
    try:
        listed = read_manifest(path, fmt)
    except CheckpointError:
        raise FileExistsError(
            f"{path} is not empty and is not an arhq-jax checkpoint; not replacing it "
            "(choose another output directory)"
        ) from None
    present = _files(path)
    foreign = [f for f in present if f != MANIFEST and f not in listed]
    if foreign:
        raise FileExistsError(
            f"{path} holds files arhq-jax did not write ({', '.join(foreign[:3])}); "
            "not replacing it"
        )
    holders = {str(q) for f in listed for q in Path(f).parents if str(q) != "."}
    dirs = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir())
    extra = [d for d in dirs if d not in holders]
    if extra:
        raise FileExistsError(
            f"{path} holds directories arhq-jax did not write ({', '.join(extra[:3])}); "
            "not replacing it"
        )
    # The same directory is checked several times per run (before the work, before the rename):
    # its files are hashed again only when their size, mtime or inode changed meanwhile.
    snap = tuple((f, *_stat_key(path / f)) for f in present)
    if _VERIFIED.get(str(path)) == snap:
        return
    try:
        verify(path, fmt)
    except CheckpointError as e:
        raise FileExistsError(
            f"{path}: its manifest does not match its files ({e}); not replacing it"
        ) from None
    _VERIFIED[str(path)] = snap


_VERIFIED: dict[str, tuple] = {}


def _stat_key(p: Path) -> tuple:
    st = p.lstat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, field 22 of /proc/<pid>/stat),
    or None where /proc does not tell (another OS, no such process)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> list:
    """``[pid, start time]`` of this process, as ``pid_alive`` takes them back."""
    return [os.getpid(), process_start(os.getpid())]


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` exists (one of another user counts) and, when ``start`` (its
    ``process_start`` when recorded) is given and the system tells, is the same process — a pid
    reused by a later process counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError):
        return False
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False
    return True


def _siblings(path: Path, infix: str) -> list[Path]:
    """The directories ``.<name><infix><8 random characters>`` beside ``path``, by exact name
    (the name is literal: never a glob pattern)."""
    prefix = f".{path.name}{infix}"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [
        path.parent / n
        for n in sorted(names)
        if n.startswith(prefix) and _RANDOM.fullmatch(n[len(prefix) :])
    ]


def _marker_pid(marker: Path) -> tuple[int, int | None] | None:
    try:
        parts = marker.read_text().split()
        pid = int(parts[0])
        start = int(parts[1]) if len(parts) > 1 and parts[1] != "None" else None
    except (OSError, ValueError, IndexError):
        return None
    return pid, start


def remove_stale(path: Path, fmt: str) -> None:
    """Remove temporary directories of killed runs beside ``path`` (only ones we marked)."""
    for d in _siblings(path, _TMP):
        if d.is_symlink() or not d.is_dir():
            continue
        owner = _marker_pid(d / _PARTIAL)
        if owner is not None and not pid_alive(*owner):
            shutil.rmtree(d, ignore_errors=True)
    for d in _siblings(path, _OLD):
        if d.is_symlink() or not (d / MANIFEST).is_file():
            continue
        try:
            check_replaceable(d, fmt)  # a complete, verified checkpoint of ours
        except (OSError, ValueError):
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
        (tmp / _PARTIAL).write_text(" ".join(map(str, this_process())))
        yield tmp
        (tmp / _PARTIAL).unlink()
        write_manifest(tmp, fmt, version)
