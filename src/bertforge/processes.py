"""Worker processes that die with bertforge: no orphans after SIGTERM, SIGKILL or a crash.

The data stages run worker pools (multiprocessing) and WikiExtractor (a subprocess that forks
its own workers). A parent stopped by SIGKILL, or by SIGTERM's default action, runs no
cleanup, and its pool workers outlive it: they finish their task, then wait forever on a task
pipe that they themselves hold open (measured: a fork pool's 2 workers still alive after
SIGTERM of the parent). So every worker asks the kernel to kill it when its parent dies
(Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`); a chain of such processes (bertforge ->
WikiExtractor -> its workers) then goes down link by link. Leftover files of such a run
(spill folders, temporaries) are the next run's to clean (bertforge/data/stage.py).

Cost: one system call per worker start. Not Linux (macOS, Windows): a no-op; a killed
parent's workers end when they next touch their closed pipes, as before.

Note that the kernel's "parent" is the *thread* that created the child: create pools and
subprocesses from a thread that lives as long as they do (every stage uses its main thread).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
from multiprocessing import get_context
from multiprocessing.pool import Pool
from typing import Any, Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# libc, from the symbols already in this process (no library search: that runs ldconfig, which
# must not happen in a preexec_fn between fork and exec). Loaded at import, in the parent.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; exit at once if the parent
    (`parent_pid`, as the parent saw itself) already died before the request took effect."""
    if _LIBC is None:
        return
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here (seccomp): fall back to the old behaviour
    if os.getppid() != parent_pid:  # reparented already: the parent died before prctl
        os._exit(1)


def _init_worker(parent_pid: int, initializer: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(workers: int, method: str | None = None, initializer: Callable | None = None,
                initargs: tuple = ()) -> Pool:
    """A multiprocessing pool (start method `method`, default the platform's) whose workers
    die with this process. Use it as a context manager, like Pool."""
    return get_context(method).Pool(workers, _init_worker,
                                    (os.getpid(), initializer, initargs))


def guarded_command(module: str, *args: Any) -> list[str]:
    """The argv that runs `python -m module args...` so that it, and every process it forks,
    dies with this process (see `main`)."""
    return [sys.executable, "-m", __name__, str(os.getpid()), module, *map(str, args)]


_parent_pid = 0  # in a forked child: the pid of the process that forked it


def _note_parent() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _child_dies_with_parent() -> None:
    die_with_parent(_parent_pid)


def main(argv: list[str]) -> None:
    """`python -m bertforge.processes PARENT_PID MODULE ARGS...`: run MODULE as __main__
    (as `python -m MODULE ARGS...` would) dying with PARENT_PID, and have each process it
    forks (multiprocessing workers) die with its own parent in turn."""
    parent_pid, module, *args = argv
    die_with_parent(int(parent_pid))
    # At-fork hooks run for os.fork (multiprocessing's "fork" start method, the default on
    # Linux before Python 3.14), not for exec-based starts ("spawn", "forkserver").
    os.register_at_fork(before=_note_parent, after_in_child=_child_dies_with_parent)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
