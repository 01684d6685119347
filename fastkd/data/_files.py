"""Write a file so that readers see either the old file or the complete new one, never a part."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator


def file_mode() -> int:
    """The permissions a new file gets from this process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; on success flush, fsync and rename it.

    The rename (``os.replace``) is atomic on POSIX and Windows within one file system, and the folder
    is synced after it, so the rename itself reaches the disk. On an exception the temporary file is
    removed and ``path`` is left as it was; a process killed mid-write leaves only a ``.<name>.*.tmp``
    file, which no reader opens. The file gets the permissions of any file the user creates
    (:func:`file_mode`), not the 0600 of a temporary file.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fchmod(stream.fileno(), file_mode())
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # a folder that cannot be opened for syncing (some file systems)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
