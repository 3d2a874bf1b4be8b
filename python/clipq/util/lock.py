"""One clipq run at a time per output: a lock file that names its holder; a dead holder's lock is taken over.

`clipq compress`, `search`, `zoo` and `reproduce` hold `OUT/.clipq.lock`, `clipq train` holds
`<snapshot_prefix>.lock`, for as long as they run. The lock itself is an flock on that file, which the
kernel drops however its holder dies (SIGKILL included); the file's text (pid, host, command, and the run's
token that marks its temporaries, `atomic.run_token`) lets a refused run name the holder. A file whose flock
is free was left by a dead holder: the next run takes it over, says so, and removes that holder's
temporaries from the output directory (only those: they carry its token). Locks are re-entrant within a process (`compress` runs the search in its own OUT), and
children given `held_fds()` keep them held until they exit too (Caffe writing its last snapshot).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from clipq.util.atomic import remove_stale_temporaries, run_token
from clipq.util.errors import ClipqError

LOCK_NAME = ".clipq.lock"

_held: dict[Path, int] = {}  # lock path -> descriptor, for the locks this process holds
_dead_tokens: dict[Path, str] = {}  # lock path -> the token of the dead holder this process took it over from


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def locked(path: str | os.PathLike, log: Callable[[str], None] = _stderr) -> Iterator[bool]:
    """Hold the lock file `path` (created if missing, removed on exit); yield whether this call took it
    (False when this process already held it). Raises ClipqError naming the holder if another has it."""
    path = Path(path).absolute()
    if path in _held:
        yield False
        return
    fd = _acquire(path, log)
    _held[path] = fd
    try:
        yield True
    finally:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the flock is dropped: nobody can lock the old file after this
        os.close(fd)


@contextlib.contextmanager
def output_directory(out: str | os.PathLike, log: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Create and lock OUT for one run; when the lock is new, delete the temporaries killed runs left.
    An OUT this created is removed again if the run leaves it empty (e.g. refused inputs)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClipqError(f"{out}: exists and is not a directory (the output directory)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with locked(out / LOCK_NAME, log) as taken:
            dead = _dead_tokens.pop((out / LOCK_NAME).absolute(), None)
            if taken and dead:
                removed = remove_stale_temporaries(out, {dead})
                if removed:
                    log(f"{out}: removed {len(removed)} temporary file(s) an interrupted run left")
            yield out
    finally:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty


@contextlib.contextmanager
def new_output(out: str | os.PathLike, command: str, log: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Hold `PARENT/.OUT.clipq.lock` while a run writes the new directory OUT (which must not exist; the run
    creates it by renaming its temporary, `atomic_dir(replace=False)`): two runs on one OUT cannot both write
    it, and the temporary of a killed run is removed by the next."""
    out = Path(out)
    lock = out.parent / f".{out.name}.clipq.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock, log) as taken:
        dead = _dead_tokens.pop(lock.absolute(), None)
        if taken and dead and remove_stale_temporaries(out.parent, {dead}, target=out.name):
            log(f"{out}: removed the temporary an interrupted run left")
        if os.path.lexists(out):
            raise ClipqError(f"{out}: already exists; clipq {command} never overwrites (give a new --out, or "
                             "delete it)")
        yield out


def held_fds() -> list[int]:
    """The descriptors of every lock this process holds (pass them to children that must keep them)."""
    return list(_held.values())


def _acquire(path: Path, log: Callable[[str], None]) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(_read(fd))
            os.close(fd)
            raise ClipqError(_refusal(path, holder)) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it after we opened it: lock the new one
    previous = _read(fd)
    if previous:
        log(f"{path.parent}: taking over the lock of a run that is no longer running ({_holder(previous)})")
        token = next((line.split()[1] for line in previous.splitlines()[1:] if line.startswith("token ")), None)
        if token:
            _dead_tokens[path] = token
    os.ftruncate(fd, 0)
    text = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\ntoken {run_token()}\n"
    os.pwrite(fd, text.encode(), 0)
    return fd


def _holder(text: str) -> str:
    """The lock text's first line: pid, host, command."""
    return text.splitlines()[0] if text else ""


def _refusal(path: Path, holder: str) -> str:
    pid = _pid(holder)
    if pid is not None and f" on {socket.gethostname()}:" in holder and not _alive(pid):
        return (f"{path.parent} is still locked by processes that a run ({holder}) started and that are "
                f"finishing (e.g. Caffe writing its last snapshot); retry in a moment")
    return (f"{path.parent} is in use by another clipq run ({holder or 'holder unknown'}); wait for it to "
            f"finish, stop it (kill {pid if pid is not None else 'PID'}), or use another output directory")


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _pid(holder: str) -> int | None:
    words = holder.split()
    return int(words[1]) if len(words) > 1 and words[0] == "pid" and words[1].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
