"""The on-disk cache (`~/.cache/medusa_jax`, or `$MEDUSA_JAX_CACHE`): keys for source files and atomic publishing.

Entries are written under a temporary name in the same directory and renamed into place, so a reader sees a whole
entry or none; two processes that build the same entry at once both succeed (the second drops its copy)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

SAMPLE = 1 << 20  # bytes hashed from each end of a source file


def cache_dir() -> str:
    return os.environ.get("MEDUSA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medusa_jax")


def file_key(path: str, salt: str = "") -> str:
    """A key for a source file's content: its size, mtime and a hash of its first and last MiB (hashing all of a
    multi-GB checkpoint would cost more than the conversion the cache saves)."""
    st = os.stat(path)
    h = hashlib.sha1(f"{salt}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE))
        if st.st_size > 2 * SAMPLE:
            f.seek(st.st_size - SAMPLE)
            h.update(f.read(SAMPLE))
    return h.hexdigest()[:20]


def entry(kind: str, key: str) -> str:
    """The path of cache entry `key` of `kind` (e.g. "tokenizers", "params")."""
    return os.path.join(cache_dir(), kind, key)


def new_dir(final: str) -> str | None:
    """A fresh temporary directory beside `final` to build an entry in (None when the cache is not writable)."""
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", dir=os.path.dirname(final))
        os.chmod(tmp, 0o755)
        return tmp
    except OSError:
        return None


def publish_dir(tmp: str, final: str) -> bool:
    """Renames the built directory `tmp` to `final`. When another process published `final` first (a rename onto a
    non-empty directory fails), or the rename fails for any other reason, `tmp` is removed. True when `final` exists
    afterwards."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return os.path.isdir(final)


def discard(tmp: str | None) -> None:
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def store(final: str, write) -> None:
    """Builds an entry with `write(tmp_dir)` and publishes it as `final`. A cache that cannot be written (full,
    read-only) only costs the conversion next time; any other error propagates, with nothing left behind."""
    tmp = new_dir(final)
    if tmp is None:
        return
    try:
        write(tmp)
    except OSError:
        discard(tmp)
        return
    except BaseException:
        discard(tmp)
        raise
    publish_dir(tmp, final)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory renamed into place: a reader sees the old
    file or the whole new one, never part of it."""
    import tempfile

    out_dir = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def chmod_default(path: str) -> None:
    """Give `path` the mode a plain `open()` would (0666 minus the umask); safetensors writes 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
