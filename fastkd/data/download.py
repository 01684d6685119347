"""Fetch an archive over HTTP(S), check its MD5, unpack it; nothing here runs unless asked to."""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request

from fastkd.data._files import atomic_write


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex MD5 digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, path: str | os.PathLike, md5: str, timeout: float = 60.0) -> str:
    """Download ``url`` to ``path`` unless a file with digest ``md5`` is already there.

    The file appears only once complete and verified (written beside ``path`` and renamed); a
    digest mismatch raises ``OSError`` naming both digests and leaves nothing behind.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and md5sum(path) == md5:
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    digest = hashlib.md5()
    with atomic_write(path) as stream:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                stream.write(block)
        got = digest.hexdigest()
        if got != md5:
            raise OSError(f"{url} downloaded with MD5 {got}, expected {md5}; the file was discarded")
    return path


def extract_tar(archive: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Unpack a (compressed) tar archive into ``folder``, refusing members that would land outside it."""
    folder = os.path.abspath(folder)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = os.path.abspath(os.path.join(folder, member.name))
            if os.path.commonpath([folder, target]) != folder or member.issym() or member.islnk():
                raise OSError(f"{archive} holds an unsafe member {member.name!r}; not extracting it")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:
            tar.extractall(folder)
