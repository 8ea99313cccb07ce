"""An engine's processes die with the process that started them, by any signal.

vLLM 0.32's API server starts `VLLM::EngineCore`, which starts `VLLM::Worker`s. A SIGKILLed
API server (OOM killer, a lost node agent) leaves both running with parent pid 1, holding
their memory (a GPU's too): EngineCore never notices its parent's death (vLLM issue 55510).
Here the kernel does the noticing: `prctl(PR_SET_PDEATHSIG, SIGKILL)` in each child.

Run from the `vllm.general_plugins` hook (`register_general`), so in every process of a
server started with `VLLM_PLUGINS=dual_sampling`:
- a multiprocessing child (vLLM's `spawn` start method, forced on CPU): the hook runs in the
  child itself; `multiprocessing.parent_process()` names its parent;
- a child started by `fork` (vLLM's default where CUDA is not yet initialised) inherits that
  vLLM already loaded the plugins and does not run the hook again; an `os.register_at_fork`
  handler, inherited with the process image, binds it instead.
The API server itself is no multiprocessing child (its parent is start_vllm.sh or a shell)
and is left alone.

The kernel sends the signal when the *thread* that forked the child exits, not the process.
vLLM starts EngineCore and its workers from the main thread (checked on vLLM 0.32:
tests/test_process_lifetime.py keeps a server serving over time), so only children forked
from a main thread are bound. A parent that died before the signal was set is caught by
comparing `os.getppid()` right after setting it: the child exits at once.

`DUAL_SAMPLING_PDEATHSIG=0` turns it off (the tests of `start_vllm.sh stop`'s orphan sweep).
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

ENABLE_ENV = "DUAL_SAMPLING_PDEATHSIG"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# (pid, whether its main thread forks), noted before each fork; the child reads its copy
_fork_parent: tuple[int, bool] | None = None
_at_fork_registered = False


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENABLE_ENV, "1") != "0"


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when `parent_pid`, its parent, dies; exit now if it already has.
    A kernel that refuses the prctl call gets a warning, not a failed engine."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed in pid %d (%s): it will outlive its "
                       "parent %d if that is killed; start_vllm.sh stop still stops it",
                       os.getpid(), os.strerror(ctypes.get_errno()), parent_pid)
        return
    if os.getppid() != parent_pid:
        # the parent died before the signal was armed: nobody will send it now
        sys.stderr.write(f"dual_sampling: pid {os.getpid()}: parent {parent_pid} is gone, "
                         f"exiting\n")
        os._exit(1)


def _note_fork() -> None:
    global _fork_parent
    _fork_parent = (os.getpid(), threading.current_thread() is threading.main_thread())


def _bind_forked_child() -> None:
    if _fork_parent is not None and _fork_parent[1] and enabled():
        die_with_parent(_fork_parent[0])


def bind_engine_process() -> None:
    """Bind this process (if it is a multiprocessing child) and every child it forks from
    its main thread to their parents' lives. Idempotent; a no-op when not enabled."""
    global _at_fork_registered
    if not enabled():
        return
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        die_with_parent(parent.pid)
        logger.debug("pid %d dies with its parent %d", os.getpid(), parent.pid)
    if not _at_fork_registered:
        os.register_at_fork(before=_note_fork, after_in_child=_bind_forked_child)
        _at_fork_registered = True
