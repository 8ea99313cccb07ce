"""Nothing left running: an engine's processes go when any of them is SIGKILLed, `start_vllm.sh
stop` stops what a killed server left behind, and one run dir holds one server per role.

The server tests start four real vLLM CPU servers (tiny theta, eager, one at a time, about a
minute each): one shared by the checks that need it alive and then killed at its API server,
one killed at its EngineCore, one at its Worker, and one without the parent-death signal
(`DUAL_SAMPLING_PDEATHSIG=0`) whose orphans `stop` must find. Processes are matched by the
process tree recorded before a kill (pid and start time), never by a global pgrep: other
servers may run on the same machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dual_sampling.serving.launch import START_SCRIPT, Servers, free_port

EXTRA = ("--max-model-len", "512", "--enforce-eager")  # eager: no warm-up compile to wait for
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")
DEADLINE_S = 30.0

Tree = dict[int, tuple[str, str]]  # pid -> (command line, start time in clock ticks)


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> Tree:
    """`root` and all its descendants as they are now."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            parents[int(entry.name)] = int(stat[1])
    members, todo = [], [root]
    while todo:
        pid = todo.pop()
        members.append(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    tree = {}
    for pid in members:
        stat = proc_stat(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if stat:
            tree[pid] = (cmdline.decode().strip(), stat[19])
    return tree


def running(tree: Tree) -> Tree:
    """The members of `tree` still running: same pid and start time, not a zombie (this
    container's init may leave those unreaped)."""
    return {pid: member for pid, member in tree.items()
            if (stat := proc_stat(pid)) and stat[19] == member[1] and stat[0] != "Z"}


def wait_until_gone(tree: Tree, deadline_s: float = DEADLINE_S) -> Tree:
    end = time.monotonic() + deadline_s
    while (left := running(tree)) and time.monotonic() < end:
        time.sleep(0.2)
    return left


def pid_of(tree: Tree, title: str) -> int:
    found = [pid for pid, (cmdline, _) in tree.items() if cmdline.startswith(title)]
    assert len(found) == 1, f"not one {title} in the engine's tree: {tree}"
    return found[0]


def script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START_SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable})


def complete(server: Servers, role: str = "model") -> int:
    body = json.dumps({"model": role, "prompt": "The cat", "max_tokens": 8}).encode()
    request = urllib.request.Request(server.url(role) + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.status


def server_pid(server: Servers, role: str = "model") -> int:
    return int((server.run_dir / f"{role}.pid").read_text())


@pytest.fixture(scope="module")
def start_server(tiny_models, tmp_path_factory):
    """`start(run_dir=None, **env)`: a `model` server on tiny theta; at the end of the module
    every one is stopped, and whatever of their process trees a failed test left is killed."""
    started: list[tuple[Servers, Tree]] = []

    def start(run_dir: Path | None = None, **env: str) -> Servers:
        server = Servers(run_dir=run_dir or tmp_path_factory.mktemp("lifetime"),
                         models={"model": tiny_models["theta"]}, extra=EXTRA, env=env)
        server.start("model")
        started.append((server, process_tree(server_pid(server))))
        return server

    yield start
    for server, tree in started:
        server.stop()
        for pid in running(tree):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reused_pid():
    """A live process that is no vLLM server: what a stale pid record points at once the
    kernel has given the dead server's pid to another process."""
    sleeper = subprocess.Popen(["sleep", "600"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


@pytest.fixture(scope="module")
def shared_server(start_server, reused_pid, tmp_path_factory) -> Servers:
    """A server started in a run dir holding a stale record (model.pid naming `reused_pid`,
    the start time of a process long gone, a port nothing listens on); the API-server case
    of the kill test kills it, last."""
    run_dir = tmp_path_factory.mktemp("lifetime")
    (run_dir / "model.pid").write_text(f"{reused_pid}\n")
    (run_dir / "model.start").write_text("1\n")
    (run_dir / "model.port").write_text(f"{free_port()}\n")
    return start_server(run_dir)


@pytest.mark.server
def test_a_stale_record_does_not_block_a_start(shared_server, reused_pid):
    assert server_pid(shared_server) != reused_pid
    assert complete(shared_server) == 200
    assert proc_stat(reused_pid)[0] != "Z", "start_vllm.sh signalled what a stale record named"


@pytest.mark.server
def test_engine_processes_with_the_death_signal_live_on_and_serve(shared_server):
    """The kernel sends the parent-death signal when the parent *thread* that started a child
    exits: had vLLM started EngineCore or a Worker from a short-lived thread, the signal would
    kill a healthy engine. Requests over 15 s, and every process of the engine still there."""
    tree = process_tree(server_pid(shared_server))
    for title in ENGINE_TITLES:
        pid_of(tree, title)
    for _ in range(6):
        assert complete(shared_server) == 200
        time.sleep(3)
    assert running(tree) == tree


@pytest.mark.server
def test_a_second_server_of_a_role_in_a_run_dir_is_refused(shared_server, tiny_models):
    pid, port = server_pid(shared_server), shared_server.ports["model"]
    began = time.monotonic()
    done = script("--cpu", "--run-dir", str(shared_server.run_dir), "--timeout", "60",
                  "--model", str(tiny_models["theta"]), "--port", str(free_port()),
                  "--", *EXTRA)
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - began < 20, "refused only after starting a server"
    message = done.stderr.strip().splitlines()[-1]
    assert f"a model server is already running in run dir {shared_server.run_dir}" in message
    assert f"(port {port}, pid {pid})" in message
    assert f"start_vllm.sh stop --run-dir {shared_server.run_dir}" in message
    assert "another --run-dir" in message
    assert server_pid(shared_server) == pid
    assert complete(shared_server) == 200


@pytest.mark.server
@pytest.mark.parametrize("victim", ["API server", *ENGINE_TITLES])
def test_a_sigkill_of_any_engine_process_leaves_none_running(victim, shared_server, start_server):
    """The API server's orphans die by the plugin's parent-death signal; EngineCore's death
    takes its workers (that signal, and vLLM's death pipe) and the API server (vLLM's
    monitor); a Worker's death takes EngineCore (vLLM's executor), and so the rest."""
    server = shared_server if victim == "API server" else start_server()
    tree = process_tree(server_pid(server))
    assert len(tree) >= 3, tree
    killed = server_pid(server) if victim == "API server" else pid_of(tree, victim)
    os.kill(killed, signal.SIGKILL)
    left = wait_until_gone(tree)
    assert not left, f"{DEADLINE_S:.0f} s after a SIGKILL of the {victim}, still running: {left}"
    done = script("stop", "--run-dir", str(server.run_dir))
    assert done.stdout.strip() == f"no running servers in {server.run_dir}", done.stdout


@pytest.mark.server
def test_stop_stops_what_a_sigkilled_server_left(start_server, tiny_models):
    """Without the parent-death signal a SIGKILLed API server's engine lives on (vLLM 0.32);
    a new start in its run dir is refused, naming it, and `stop` finds it by its mark."""
    server = start_server(DUAL_SAMPLING_PDEATHSIG="0")
    pid = server_pid(server)
    tree = process_tree(pid)
    os.kill(pid, signal.SIGKILL)
    time.sleep(5)
    orphans = running(tree)
    assert {cmdline.split()[0] for cmdline, _ in orphans.values()} >= set(ENGINE_TITLES), orphans

    done = script("--cpu", "--run-dir", str(server.run_dir), "--timeout", "60",
                  "--model", str(tiny_models["theta"]), "--port", str(free_port()), "--", *EXTRA)
    assert done.returncode == 1, done.stdout + done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert "a model server is already running" in message and "its API server died" in message
    assert f"start_vllm.sh stop --run-dir {server.run_dir}" in message

    done = script("stop", "--run-dir", str(server.run_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"stopped model: its server (pid {pid}) had died"), done.stdout
    assert not wait_until_gone(tree, 15)
    assert not (server.run_dir / "model.pid").exists()


CHILD_SCRIPT = """
import multiprocessing, sys, threading, time
from dual_sampling.vllm_plugin.lifetime import bind_engine_process

def child(bind):
    if bind:  # what the plugin hook does in a spawned vLLM process
        bind_engine_process()
    time.sleep(120)

if __name__ == "__main__":
    how = sys.argv[1]
    bind_engine_process()
    method = "spawn" if how == "spawn" else "fork"
    proc = multiprocessing.get_context(method).Process(target=child, args=(how == "spawn",))
    if how == "fork-in-a-thread":  # a thread that ends once its child is started
        starter = threading.Thread(target=proc.start)
        starter.start()
        starter.join()
    else:
        proc.start()
    print(proc.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["spawn", "fork", "fork-in-a-thread"])
def test_a_child_dies_with_its_parent_unless_a_passing_thread_started_it(how, tmp_path):
    """Spawned (vLLM on CPU) and forked (vLLM's default elsewhere) children die with their
    parent; one forked from a thread that has ended is left alone (the kernel would kill it
    when that thread ends, its parent still alive)."""
    (tmp_path / "parent.py").write_text(CHILD_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), how],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(2)  # a spawned child binds itself once it runs; a wrongly bound one dies
        assert running({child: ("child", proc_stat(child)[19])}), "the child died, its parent alive"
        tree = {child: ("child", proc_stat(child)[19])}
        parent.kill()
        parent.wait()
        left = wait_until_gone(tree, 5)
        assert bool(left) == (how == "fork-in-a-thread"), left
    finally:
        parent.kill()
        if proc_stat(child):
            os.kill(child, signal.SIGKILL)
