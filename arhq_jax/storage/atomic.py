"""The one atomic-write mechanism: write beside the target under a temporary name, then rename.

``atomic_file(path)`` yields a temporary file path in ``path``'s directory; on success it gets the
permissions of an ordinary new file and replaces ``path`` (``os.replace``); on failure it is
removed. ``atomic_dir(dst, check)`` does the same for a directory: the caller fills the yielded
temporary directory; ``check()`` — the caller's safety rule, e.g. "``dst`` is absent, or a
directory this program wrote and nothing else" — runs before any work and again just before the
rename, and raises to refuse; an existing ``dst`` is moved aside, the new one renamed into place,
the old one removed (put back if the second rename fails). Nothing is ever replaced that
``check`` did not accept, and a failure leaves ``dst`` as it was.

Callers: ``report`` (reports, figures), ``converters.safetensors_io`` (each safetensors file),
``converters.hf`` / ``orbax_io`` (``convert``'s model directories) and ``out_dir`` (checkpoints,
which add their manifest and a marker of the writing process inside the temporary directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_INFIX = ".arhq-tmp-"
OLD_INFIX = ".arhq-old-"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the result the permissions of an ordinary new file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, check: Callable[[], None]) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``dst`` to fill; it becomes ``dst`` on success.

    ``check()`` raises (e.g. FileExistsError) when ``dst`` must not be replaced; it runs before
    the directory is created and again just before the rename."""
    dst = Path(dst)
    check()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}{TMP_INFIX}"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        check()  # again: something may have appeared meanwhile
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}{OLD_INFIX}"))
            os.rmdir(old)
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
