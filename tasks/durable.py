"""Files that are whole or absent: content hashes, fsync, atomic replacement, and a zero-copy write
of large buffers that hashes them while they go to disk."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def stat_fingerprint(path: Path) -> list[int]:
    """Size and modification time: what a rename keeps and any rewrite changes."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def beside(background: Callable[[], Any], foreground: Callable[[], Any]) -> Any:
    """foreground()'s result, with background() run in a thread meanwhile. Both have ended when
    this returns or raises; an error in either is raised here (the foreground's first). For work
    that waits on the disk or hashes large buffers, which release the GIL."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            background()
        except BaseException as error:  # re-raised in the caller
            failed.append(error)

    thread = threading.Thread(target=run, name="store-io")
    thread.start()
    try:
        result = foreground()
    finally:
        thread.join()
    if failed:
        raise failed[0]
    return result


def synced_sha256(path: Path) -> str:
    """fsync the file and return its sha256, the two at once: fsync waits on the disk and hashing
    reads the page cache (on 160 MB: about 0.1-0.2 s each, the longer of the two together)."""
    return beside(lambda: _fsync_file(path), lambda: sha256_file(path))


class Written(str):
    """The sha256 of a file that its writer hashed and fsynced itself (write_buffers): the store
    takes it as it is instead of reading the file back."""


def write_buffers(path: Path, buffers: list) -> Written:
    """Write the buffers (bytes, C-contiguous arrays) one after another into a new file and fsync
    it, hashing the same bytes from memory meanwhile; returns the file's sha256.

    Each buffer goes to write(2) as it is, with no copy. On a 160 MB table: 0.14-0.36 s (writing
    into the page cache 0.04-0.28 s, depending on how much of it the kernel must reclaim first,
    then fsync 0.08 s, beside hashing 0.14 s), where joblib.dump, which copies every 16 MB chunk
    into a new bytes object, followed by hashing the file took 0.35-0.6 s.
    """
    views = [memoryview(buffer).cast("B") for buffer in buffers]

    def write() -> None:
        with open(path, "xb", buffering=0) as handle:
            for view in views:
                while view:
                    view = view[handle.write(view):]
            os.fsync(handle.fileno())

    def digest() -> str:
        hashed = hashlib.sha256()
        for view in views:
            hashed.update(view)
        return hashed.hexdigest()

    return Written(beside(write, digest))


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary sibling, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"))
