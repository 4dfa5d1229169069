"""Run model-written Python (e.g. HumanEval completions) in a sandbox, Linux only.

run_program(source) writes `source` to program.py in a fresh temporary directory and runs it
there under minitrain/sandbox_child.py, which confines the program before running it (rlimits;
user, network, pid and IPC namespaces; no capabilities; Landlock; seccomp: its docstring says what
each layer stops and what it does not). This side adds what a parent can: a scrubbed environment,
a wall-clock timeout that kills the child's whole process group, and capped output.

No preexec_fn: the caller may have BLAS threads, and running Python between fork and exec in a
threaded process is unsafe. All confinement happens in the child, after exec.

What the program can still do: read any file you can read (and print it: the output comes back
in the Outcome), fill the temporary directory's filesystem with many files, use cpu_s of CPU in
each of many processes until wall_s, and, when you are root, start any number of processes.
"""

import functools
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minitrain import sandbox_child

CHILD = Path(__file__).with_name("sandbox_child.py")
OUTPUT_CAP = 64 * 1024  # bytes of each of stdout and stderr kept (the last ones)
DETAIL_CAP = 200  # characters of Outcome.detail
GRACE_S = 2.0  # after the kill: how long to wait for the last writers of the output pipes to die


@dataclass(frozen=True)
class Limits:
    """What one program may use. Each rlimit binds every process of the program separately.

    cpu_s: CPU seconds (RLIMIT_CPU, rounded up): SIGXCPU then, SIGKILL a second later.
    wall_s: wall-clock seconds before the parent kills everything the program started.
    memory_bytes: address space (RLIMIT_AS): a larger allocation raises MemoryError.
    file_bytes: largest file it may write (RLIMIT_FSIZE): a write past it fails with EFBIG.
    open_files: file descriptors open at once (RLIMIT_NOFILE).
    processes: processes and threads (RLIMIT_NPROC), counted per user; does not bind root.
    """

    cpu_s: float = 10.0
    wall_s: float = 20.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    open_files: int = 256
    processes: int = 64


@dataclass(frozen=True)
class Outcome:
    """How a program ended.

    passed: exit status 0 within the limits.
    status: "passed", "failed" (nonzero exit, uncaught exception, killed by a signal),
        "timed out" (wall_s or cpu_s ran out) or "error" (the sandbox could not run it).
    detail: one line: the last line of stderr ("AssertionError"), "exit status 3", "killed by
        SIGXCPU ...", or what is missing; at most DETAIL_CAP characters.
    stdout, stderr: the last OUTPUT_CAP bytes of each, decoded as UTF-8 (bad bytes replaced).
    """

    passed: bool
    status: str
    detail: str
    stdout: str = ""
    stderr: str = ""


@functools.cache
def sandbox_support():
    """None when the sandbox can run here, else one sentence saying what is missing.
    Runs an empty program through the whole sandbox once per process (cached)."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux (Landlock, namespaces, seccomp); this is {sys.platform}"
    outcome = _run(b"", Limits())
    return None if outcome.passed else outcome.detail


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program in the sandbox; passed = exit status 0 within the limits."""
    problem = sandbox_support()
    if problem is not None:
        return Outcome(False, "error", problem)
    return _run(source.encode("utf-8"), limits)


def _run(source, limits):
    """Write program.py into a fresh temporary directory, run the child there, describe the end."""
    with tempfile.TemporaryDirectory(prefix="minitrain-sandbox-") as tmp:
        Path(tmp, "program.py").write_bytes(source)
        try:
            code, out, err, timed_out = _run_child(tmp, limits)
        except OSError as e:
            return Outcome(False, "error", f"could not start {sys.executable}: {e}"[:DETAIL_CAP])
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    status, detail = _describe(code, err, timed_out, limits)
    return Outcome(status == "passed", status, detail[:DETAIL_CAP], out, err)


def _run_child(tmp, limits):
    """Start the child in its own session, copy its output until it exits or wall_s passes, kill
    its process group (leftovers, or everything on a timeout), drain the pipes, reap it.
    Returns (exit code as Popen gives it, stdout, stderr, timed out)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
    argv = [sys.executable, "-I", "-S", str(CHILD), tmp, json.dumps(asdict(limits))]
    with subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True) as proc, \
            selectors.DefaultSelector() as sel:
        out, err, pidfd = bytearray(), bytearray(), os.pidfd_open(proc.pid)
        try:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            sel.register(pidfd, selectors.EVENT_READ, None)
            try:
                exited = _pump(sel, time.monotonic() + limits.wall_s)
            finally:
                _kill_group(proc.pid)  # not yet reaped: the group id cannot have been reused
            if not exited:
                sel.unregister(pidfd)
            _pump(sel, time.monotonic() + GRACE_S)
        finally:
            os.close(pidfd)
    return proc.returncode, bytes(out), bytes(err), not exited


def _pump(sel, deadline):
    """Copy the registered pipes into their buffers (keeping the last OUTPUT_CAP bytes) until the
    pidfd, if registered, says the child exited (True), or every pipe is closed, or the deadline."""
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for key, _ in sel.select(left):
            if key.data is None:  # the pidfd
                sel.unregister(key.fileobj)
                return True
            chunk, kept = os.read(key.fd, 1 << 16), key.data
            if not chunk:
                sel.unregister(key.fileobj)
            kept += chunk  # in place: kept is the bytearray
            del kept[:-OUTPUT_CAP]
    return False


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe(code, err, timed_out, limits):
    """(status, detail) of an exit code as Popen gives it (negative: killed by that signal)."""
    last_line = next((line.strip() for line in reversed(err.splitlines()) if line.strip()), "")
    if timed_out:
        return "timed out", f"still running after the wall-clock limit of {limits.wall_s:g} s: killed"
    if code == 0:
        return "passed", ""
    if code == -signal.SIGXCPU:
        return "timed out", f"killed by SIGXCPU: used the CPU limit of {limits.cpu_s:g} s"
    if code < 0:
        return "failed", f"killed by {signal.Signals(-code).name}"
    if code == sandbox_child.EXIT_UNCONFINED and last_line.startswith(sandbox_child.MESSAGE_PREFIX):
        return "error", last_line.removeprefix(sandbox_child.MESSAGE_PREFIX)
    return "failed", last_line or f"exit status {code}"
