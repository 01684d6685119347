"""Write a file so that readers see either the old file or the complete new one, never a part."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; on success flush, fsync and rename it.

    The rename (``os.replace``) is atomic on POSIX and Windows within one file system. On an
    exception the temporary file is removed and ``path`` is left as it was; a process killed
    mid-write leaves only a ``.<name>.*.tmp`` file, which no reader opens.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
