"""Where a verb writes: the one output-path check, the atomic file writer and the output lock.

Every verb that writes calls ``check_output`` once on each path it will write, before any work starts, so a bad
``--out`` (a file as its parent, a folder where a file goes or the reverse, a place this user cannot write) ends with
one ``OutputError`` line naming the path instead of a traceback after minutes of work. ``atomic_file`` (files) and
``quest_export_runtime.manifest.atomic_dir`` (folders) write through a hidden temporary sibling that is removed on
any exception, a full disk and an interrupt included; ``write_error`` turns the OSError of a failed write into the
same one line. ``output_lock`` keeps two runs from writing the same artifact at once. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from quest_export_runtime.errors import OutputError, QuestExportError

# errors of a write that no read can raise: inside a stage's atomic folder these are reported as the output's fault
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
LOCK_PREFIX = "."
LOCK_SUFFIX = ".lock"


def check_output(path: str | os.PathLike, kind: str = "file") -> Path:
    """Refuse ``path`` as the output of a verb unless a ``kind`` ("file" or "dir") can be written there.

    Nothing is created. Refused, with one line naming the path: an existing folder where a file goes or an existing
    file where a folder goes, an ancestor that is a file, and a nearest existing folder this user cannot write in.
    Returns the path made absolute.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    path = Path(path).expanduser().absolute()
    if kind == "file" and path.is_dir():
        raise OutputError(f"{path}: is a folder, the output here is a file; name a file inside it "
                          f"({path}/NAME) or choose another path")  # fmt: skip
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputError(f"{path}: is a file, the output here is a folder; remove it or choose another path")
    parent = path.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is a file, not a folder; choose an output path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in {parent} (permission denied); choose a writable location")
    return path


def write_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """The one line for a write to ``path`` that failed with ``e`` (disk full, read-only, permission...)."""
    what = e.strerror or type(e).__name__
    hint = "free some space or choose another location" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "choose a writable location"  # fmt: skip
    err = OutputError(f"{Path(path)}: could not be written ({what}); nothing was left there; {hint}")
    err.path, err.os_error = Path(path), e  # atomic_dir re-names a failed write inside its temporary folder
    return err


def disk_full(e: BaseException, where: str | os.PathLike) -> bool:
    """Whether ``e``, raised by a writer that does not raise OSError (safetensors, torch.save), is a full disk:
    its message says so (safetensors does), or the file system under ``where`` has no block left."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if "No space left on device" in str(e):
        return True
    try:
        return os.statvfs(where).f_bavail == 0
    except OSError:
        return False


def temp_sibling(path: Path) -> Path:
    """The hidden temporary name a write to ``path`` goes through (``.NAME.tmp-PID-RANDOM``)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it becomes ``path`` only if the block succeeds.

    On any exception (an interrupt included) the temporary file is removed; an OSError of the write (disk full,
    permission, read-only) becomes one ``OutputError`` naming ``path``.
    """
    path = Path(path)
    made = make_parents(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        _unlink(tmp)
        remove_made(made)
        if (failed := write_failure(e, path, tmp, any_oserror=True)) is not None:
            raise failed from None
        raise


def write_failure(e: BaseException, out: Path, tmp: Path, *, any_oserror: bool = False) -> OutputError | None:
    """The one line for ``e``, raised while writing ``out`` through ``tmp``, when it is the write that failed.

    A write failed when: ``e`` is an OSError with a WRITE_ERRNOS errno, or naming ``out`` or a path under ``tmp``
    (every OSError with ``any_oserror``: a single file's write does nothing else); ``e`` is the OutputError of a
    file written under ``tmp`` (it is re-said for ``out``); or ``e`` comes from a writer with its own exception
    type (safetensors, torch.save) while the disk is full. None otherwise (an interrupt, a bug, a user error).
    """
    if isinstance(e, OutputError):
        inner = getattr(e, "os_error", None)
        inside = str(getattr(e, "path", "")).startswith(str(tmp))
        return write_error(out, inner) if inner is not None and inside else None
    if isinstance(e, OSError):
        names = [str(f) for f in (e.filename, e.filename2) if f]
        if any_oserror or e.errno in WRITE_ERRNOS or any(f == str(out) or f.startswith(str(tmp)) for f in names):
            return write_error(out, e)
        return None
    if isinstance(e, Exception) and not isinstance(e, QuestExportError) and disk_full(e, out.parent):
        return write_error(out, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return None


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; return them (outermost first) for ``remove_made``."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_made(missing[::-1])
        raise write_error(path, e) from None
    return missing[::-1]


def remove_made(made: list[Path]) -> None:
    """Remove the folders ``make_parents`` created, innermost first, where they are still empty."""
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def _unlink(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f"{LOCK_PREFIX}{path.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the artifact ``path`` (``.NAME.lock`` beside it) while writing it.

    Non-blocking: when another process holds it, one ``OutputError`` line names that process's pid. The lock
    file records the holder's pid and is removed on release. POSIX only (fcntl); elsewhere nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield Path(path)
        return
    path = Path(path)
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(lock, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise OutputError(f"{path}: another quest-export run (pid {holder}) is writing it; wait for it to end "
                              f"or choose another output (the lock is {lock})") from None  # fmt: skip
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by a holder releasing meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        _unlink(lock)  # before unlocking: a process waiting on this inode then sees it is stale and retries
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


__all__ = ["WRITE_ERRNOS", "atomic_file", "check_output", "disk_full", "lock_path", "make_parents", "output_lock", "remove_made",
           "temp_sibling", "write_bytes_atomic", "write_error", "write_failure", "write_text_atomic"]  # fmt: skip
