"""Write outputs so that a crash or Ctrl-C never leaves a half-written file or directory behind.

A temporary is named `.NAME.clipq-TOKEN-XXXXXXXX.tmp` next to its target (a replaced directory briefly
becomes `.NAME.clipq-TOKEN.old`), TOKEN being the run's (`run_token`, inherited by its child processes and
recorded in the lock of the output directory it holds). Only SIGKILL or a power cut can leave one; the next
run that takes over that lock removes the temporaries carrying the dead run's token, and nothing else
(`remove_stale_temporaries`): a file clipq did not make is never touched, whatever its name. Outputs get the
modes of ordinary files (0666, 0777 for directories, less the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Collection, Iterator

TOKEN_VARIABLE = "CLIPQ_RUN_TOKEN"
TEMPORARY_RE = re.compile(r"\..+\.clipq-(?P<token>[0-9a-f]+)(-[a-z0-9_]{8}\.tmp|\.old)")


def run_token() -> str:
    """This run's token, made once per process tree (child processes inherit it through the environment)."""
    token = os.environ.get(TOKEN_VARIABLE, "")
    if not re.fullmatch(r"[0-9a-f]{8,32}", token):
        token = os.environ[TOKEN_VARIABLE] = f"{os.getpid():x}{secrets.token_hex(4)}"
    return token


def _prefix(path: Path) -> str:
    return f".{path.name}.clipq-{run_token()}-"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path`; on success rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.filename is None:  # a failed write (a full disk) names no file: name the output
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success it replaces `path` (old content removed), or, with
    replace=False, becomes `path` only if nothing is there (else an error naming it; nothing is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if not replace:
            _rename_new(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        _replace(tmp, path)


def _rename_new(new: Path, path: Path) -> None:
    """Rename the directory `new` to `path`, which must not exist (rename would silently replace an empty
    directory: refused too, as something another program made)."""
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "appeared while clipq was writing it; left as it is", str(path))
    os.rename(new, path)  # a non-empty directory made since the check: ENOTEMPTY, nothing replaced


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a path for another program to write (a file or a directory; e.g. one of Caffe's tools), inside a
    temp directory next to `path`; on success what it wrote replaces `path`, on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield holder / path.name
        _replace(holder / path.name, path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _replace(new: Path, path: Path) -> None:
    """Rename `new` over `path`. A file replaces a file in one rename; where either is a directory, what is at
    `path` is first moved aside (rename cannot replace a directory), then removed."""
    old = None
    if os.path.lexists(path) and (new.is_dir() or path.is_dir()):
        old = path.with_name(f".{path.name}.clipq-{run_token()}.old")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def remove_stale_temporaries(directory: str | os.PathLike, tokens: Collection[str], target: str | None = None
                             ) -> list[Path]:
    """Delete the temporaries under `directory` that runs with these tokens made (dead runs whose lock this
    process took over; call only while holding that lock); return what was removed. Hidden directories other
    than temporaries are not entered. With `target`, only the temporaries of that one name in `directory`
    itself (not below it)."""
    removed = []
    for root, dirs, files in os.walk(directory):
        for name in files + dirs:
            match = TEMPORARY_RE.fullmatch(name)
            if match and match["token"] in tokens and (target is None or name.startswith(f".{target}.clipq-")):
                path = Path(root) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
        dirs[:] = [] if target is not None else [name for name in dirs if not name.startswith(".")]
    return removed


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it before Python 3.13; set back at once
    os.umask(mask)
    return mask
