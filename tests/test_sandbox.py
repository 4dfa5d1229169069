"""The sandbox for model-written programs: verdicts, limits, and each confinement layer, checked
from outside. Each test names the layer it pins; where two layers stop the same thing the test
accepts either, and a sibling test pins each one alone where that is possible."""

import json
import os
import socket
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import minitrain
from minitrain.sandbox import GRACE_S, OUTPUT_CAP, Limits, run_program, sandbox_support

pytestmark = pytest.mark.skipif(sandbox_support() is not None, reason=f"no sandbox here: {sandbox_support()}")

REPO = Path(minitrain.__file__).resolve().parent.parent


def run(source, **limits):
    return run_program(textwrap.dedent(source), Limits(**limits))


# Around a probing program's body: attempt(name, f) records "ok" or the exception's class name.
PROBE = """
import json, os
tried = {}
def attempt(name, f):
    try:
        f()
        tried[name] = "ok"
    except Exception as e:
        tried[name] = type(e).__name__
%s
print(json.dumps(tried))
"""


def probe(body, **limits):
    """Run PROBE around `body`; what it tried, {name: "ok" or the exception's class name}."""
    out = run_program(PROBE % textwrap.dedent(body), Limits(**limits))
    assert out.passed, out
    return json.loads(out.stdout.splitlines()[-1])


def test_sandbox_is_supported_here():
    assert sandbox_support() is None


def test_a_correct_program_passes():
    out = run("""
        import subprocess, sys
        subprocess.run(["true"], stdout=subprocess.DEVNULL, check=True)  # exec, and /dev/null is writable
        print("hello"); print("warning", file=sys.stderr)
    """)
    assert (out.passed, out.status, out.detail, out.stdout, out.stderr) == (True, "passed", "", "hello\n", "warning\n")


@pytest.mark.parametrize("source, detail", [
    ("assert False", "AssertionError"),
    ("def f(:\n    pass", "SyntaxError: invalid syntax"),
    ("import sys\nsys.exit(3)", "exit status 3"),
    ("raise KeyError('k')", "KeyError: 'k'"),
    ("input()", "EOFError: EOF when reading a line"),  # stdin is /dev/null
])
def test_a_wrong_program_fails(source, detail):
    out = run(source)
    assert (out.passed, out.status, out.detail) == (False, "failed", detail)


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    start = time.monotonic()
    out = run("while True: pass", cpu_s=1, wall_s=10)
    assert (out.passed, out.status) == (False, "timed out")
    assert "SIGXCPU" in out.detail  # the CPU rlimit, not the wall clock, stopped it
    assert time.monotonic() - start < 8


SPAWN = """
import os, subprocess, time
subprocess.Popen(["sleep", "100"])
if os.fork() == 0:  # a daemon: double fork, new session, so it leaves the process group
    os.setsid()
    if os.fork() == 0:
        print("pid", os.readlink("/proc/self"), flush=True)  # its pid as the host sees it
        time.sleep(100)
    os._exit(0)
me = os.readlink("/proc/self")
for pid in open(f"/proc/{me}/task/{me}/children").read().split():
    print("pid", pid, flush=True)
time.sleep(0.5)
"""


def _gone(pid, within=3.0):
    """Whether /proc/PID disappears within `within` seconds."""
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("ending, status", [("time.sleep(100)", "timed out"), ("pass", "passed")])
def test_every_process_the_program_started_dies_with_it(ending, status):
    """The wall timeout (killpg) stops a sleeper; the pid namespace's anchor takes down its
    children, even a daemon that left the process group, on a timeout and on a normal exit."""
    start = time.monotonic()
    out = run(SPAWN + ending, wall_s=3)
    assert out.status == status, out
    assert time.monotonic() - start < 3 + GRACE_S + 2
    if status == "timed out":
        assert "wall-clock" in out.detail
    pids = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("pid ")]
    assert len(pids) == 3, out.stdout  # sleep, the daemon's parent (a zombie until it is reaped), the daemon
    assert all(_gone(pid) for pid in pids), [p for p in pids if Path(f"/proc/{p}").exists()]


def test_a_large_allocation_fails_under_the_memory_limit():
    out = run("x = bytearray(4 << 30)", memory_bytes=512 << 20)
    assert (out.status, out.detail) == ("failed", "MemoryError")


def test_a_large_file_fails_under_the_file_size_limit():
    out = run("open('big', 'wb').write(bytes(10 << 20))", file_bytes=1 << 20)
    assert (out.status, out.detail) == ("failed", "OSError: [Errno 27] File too large")


def test_files_outside_the_temporary_directory_cannot_be_changed(tmp_path):
    """Landlock: creating, linking, truncating, overwriting, renaming or deleting files outside the
    program's directory fails, in a directory the test owns and in the repository itself, and
    leaves nothing changed; the same operations in the program's own directory work."""
    name = f"sandbox-escape-{uuid.uuid4().hex}"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    outside = [d / (name + suffix) for d in (tmp_path, REPO) for suffix in ("", ".d", ".lnk")]
    try:
        tried = probe(f"""
            for where, d in [("test dir", {str(tmp_path)!r}), ("repository", {str(REPO)!r}), ("own dir", ".")]:
                new = os.path.join(d, {name!r})
                attempt(where + " create", lambda: open(new, "x").close())
                attempt(where + " mkdir", lambda: os.mkdir(new + ".d"))
                attempt(where + " symlink", lambda: os.symlink("/etc/passwd", new + ".lnk"))
            open("keep.txt", "w").write("mine")
            for where, keep in [("test dir", {str(keep)!r}), ("own dir", "keep.txt")]:
                attempt(where + " truncate", lambda: os.truncate(keep, 0))
                attempt(where + " overwrite", lambda: open(keep, "w").write("gone"))
                attempt(where + " rename", lambda: os.rename(keep, keep + ".moved"))
                moved = keep + ".moved"
                attempt(where + " delete", lambda: os.remove(moved if os.path.exists(moved) else keep))
        """)
        made, changed = ["create", "mkdir", "symlink"], ["truncate", "overwrite", "rename", "delete"]
        assert tried == ({f"{w} {op}": "PermissionError" for w in ["test dir", "repository"] for op in made}
                         | {f"test dir {op}": "PermissionError" for op in changed}
                         | {f"own dir {op}": "ok" for op in made + changed})
        assert not any(p.exists() or p.is_symlink() for p in outside)
        assert keep.read_text() == "precious" and list(tmp_path.iterdir()) == [keep]
    finally:  # had the sandbox failed, leave no trace in the repository
        for p in outside:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            elif p.exists() or p.is_symlink():
                p.unlink()


def test_the_environment_is_scrubbed_and_the_directory_fresh(monkeypatch):
    monkeypatch.setenv("MINITRAIN_SECRET", "hunter2")
    out = run("""
        import json, os
        print(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "files": os.listdir(".")}))
    """)
    seen = json.loads(out.stdout)
    assert seen["env"] == {"PATH": "/usr/bin:/bin", "HOME": seen["cwd"], "TMPDIR": seen["cwd"], "LANG": "C.UTF-8"}
    assert seen["files"] == ["program.py"] and seen["cwd"] != os.getcwd()
    assert not Path(seen["cwd"]).exists()


def test_processes_outside_the_sandbox_are_out_of_reach():
    """No /proc/PID/environ (whatever secrets the trainer was started with) or mem of the test
    process: the user namespace and the dropped capabilities stop both, Landlock stops mem only.
    No signals to it: Landlock's signal scope and the pid namespace, each alone."""
    tried = probe(f"""
        attempt("environ", lambda: open("/proc/{os.getpid()}/environ", "rb").read())
        attempt("mem", lambda: open("/proc/{os.getpid()}/mem", "rb").close())
        attempt("signal", lambda: os.kill({os.getpid()}, 0))
    """)
    assert tried["environ"] == tried["mem"] == "PermissionError"
    assert tried["signal"] in ("PermissionError", "ProcessLookupError")


def test_a_tcp_server_on_localhost_is_unreachable_from_the_sandbox_only():
    """Network namespace and Landlock's TCP rules (either suffices)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        server.accept()[0].close()
        tried = probe(f"""
            import socket
            attempt("connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
        """)
        assert tried["connect"] in ("PermissionError", "OSError")  # EACCES (Landlock), ENETUNREACH (netns)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_udp_to_localhost_does_not_arrive_from_the_sandbox():
    """The network namespace alone (Landlock has no UDP rules): the loopback there is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"from the test", rx.getsockname())
        rx.settimeout(2)
        assert rx.recv(64) == b"from the test"  # arrives from here
        tried = probe(f"""
            import socket
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            attempt("sendto", lambda: udp.sendto(b"x", {rx.getsockname()!r}))
        """)
        assert tried["sendto"] == "OSError"  # ENETUNREACH
        rx.setblocking(False)
        with pytest.raises(BlockingIOError):
            rx.recv(64)


def test_tcp_bind_is_denied():
    """Landlock's TCP rules alone: in the network namespace, binding the wildcard address would work."""
    tried = probe("""
        import socket
        attempt("bind", lambda: socket.socket().bind(("0.0.0.0", 0)))
    """)
    assert tried["bind"] == "PermissionError"


def test_unix_sockets_and_io_uring_are_denied(tmp_path):
    """seccomp alone: a Unix socket named by a path (Docker's, D-Bus's) crosses both the network
    namespace and Landlock; io_uring could make sockets without socket()."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        socket.socket(socket.AF_UNIX).connect(path)  # reachable from here
        server.accept()[0].close()
        tried = probe(f"""
            import ctypes, socket
            attempt("unix", lambda: socket.socket(socket.AF_UNIX).connect({path!r}))
            def io_uring_setup():
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.syscall(425, 8, ctypes.create_string_buffer(120)) < 0:
                    raise OSError(ctypes.get_errno(), "io_uring_setup")
            attempt("io_uring", io_uring_setup)
        """)
        assert tried == {"unix": "PermissionError", "io_uring": "PermissionError"}
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_the_program_holds_no_capabilities():
    """Capabilities dropped and no_new_privs: none in the program, none regained by exec."""
    out = run("""
        import subprocess
        print(open("/proc/self/status").read())
        print(subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout)
    """)
    wanted = ("CapEff", "CapPrm", "NoNewPrivs")
    fields = [line.split(":\t") for line in out.stdout.splitlines() if line.startswith(wanted)]
    assert fields == [["CapPrm", "0000000000000000"], ["CapEff", "0000000000000000"], ["NoNewPrivs", "1"]] * 2


def test_output_is_capped_to_its_last_bytes():
    out = run("import sys\nsys.stdout.write('x' * (1 << 20) + 'end')")
    assert out.passed and len(out.stdout) == OUTPUT_CAP and out.stdout.endswith("xend")
