"""How clipq's processes end: SIGTERM and SIGHUP stop a run as Ctrl-C does, and children die with clipq.

Ctrl-C (SIGINT) raises KeyboardInterrupt, which the long stages turn into an orderly stop: the search
terminates and reaps its workers, `clipq train` asks Caffe to snapshot and waits for it.
`interrupt_on_termination` sends SIGTERM and SIGHUP down the same path. A SIGKILLed clipq cleans up
nothing, so its children ask the kernel (Linux's PR_SET_PDEATHSIG) for a signal when it dies: search
workers get SIGTERM, Caffe gets SIGINT and snapshots.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child between fork and exec should not load it


def interrupt_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as SIGINT does."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)


def end_with_parent(sig: int, parent: int) -> None:
    """In a child of `parent`: have the kernel send `sig` to this process when the parent dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # it died before the request: no signal will come
        os._exit(1)
