"""The sandbox's child side: confine a process, then run DIR/program.py in it (Linux only).

Standard library only: minitrain.sandbox starts it as `python -I -S sandbox_child.py DIR LIMITS`
(LIMITS is a JSON object), so it sees no site-packages and cannot import minitrain. Importing
it only loads libc; minitrain.sandbox does, for EXIT_UNCONFINED and MESSAGE_PREFIX.

Processes (this one stays in the host's pid namespace and never runs model code):

    sandbox_child: waits for the program, relays how it ended
     |-- anchor:  pid 1 of a new pid namespace; when it dies the kernel kills every process in it
     `-- program: pid 2 of that namespace; confined, then runs program.py

The parent kills this whole process group on its wall-clock timeout; the anchor is in that group
and nothing in the namespace can take it out, so every process the program started dies too, even
one that called setsid(). The layers, applied to the program only, each stop something different:

    namespaces   (user, net, pid, ipc) no network but a loopback that is down; host processes and
                 System V IPC out of sight; no capability over anything outside (so no reading
                 /proc/PID/environ or maps of host processes). Do NOT stop: file access (same
                 mounts), Unix sockets named by a path, vsock.
    rlimits      CPU seconds, address space, file size, open files, processes (not for root).
    capabilities all dropped, and no_new_privs: a root program cannot reboot, load modules, mount
                 or gain privileges by exec (it still passes root's file-permission checks).
    Landlock     no write, create, delete, rename, truncate or device ioctl outside DIR (except
                 writing /dev/null); no TCP bind or connect; no signals or abstract Unix sockets
                 outside the sandbox; no ptrace or /proc/PID/mem of processes outside it.
                 Does NOT stop reading any file the user can read, nor (measured on Linux 6.18)
                 /proc/PID/environ or maps of the user's other processes.
    seccomp      sockets only of AF_INET/AF_INET6 (useless without a network), no io_uring:
                 shuts the Unix-socket (Docker, D-Bus, systemd) and vsock doors that neither
                 Landlock nor the namespaces close.
Also NOT stopped: filling the disk with many files of file_bytes each, reading the clock,
using the CPU for cpu_s in each of many processes, printing what it read (it comes back).
"""

import ctypes
import json
import math
import os
import resource
import signal
import struct
import sys
import traceback

EXIT_UNCONFINED = 125  # with a "sandbox_child: ..." line on stderr: the program never ran
MESSAGE_PREFIX = "sandbox_child: "

CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38

# machine -> (AUDIT_ARCH_* for seccomp, number of socket()). Landlock's syscalls are 444, 445, 446
# and io_uring_setup is 425 on both.
ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
SYS_IO_URING_SETUP = 425

# Landlock filesystem rights (ABI version that introduced each in the comment).
FS_WRITE_FILE, FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR = 1 << 1, 1 << 4, 1 << 5, 1 << 6  # 1
FS_MAKE_DIR, FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO = 1 << 7, 1 << 8, 1 << 9, 1 << 10  # 1
FS_MAKE_BLOCK, FS_MAKE_SYM = 1 << 11, 1 << 12  # 1
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # 2, 3, 5
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # 6

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class Unconfined(Exception):
    """A layer could not be applied: the program must not run. The message is one sentence."""


def _check(result, what):
    """A libc call's result, or Unconfined naming the call and errno when it returned -1."""
    if result == -1:
        err = ctypes.get_errno()
        raise Unconfined(f"{what} failed: {os.strerror(err)} (errno {err})")
    return result


def _prctl(option, arg, what):
    _check(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), what)


def landlock_abi():
    """The kernel's Landlock ABI version (1+), or a sentence saying why there is none."""
    if os.uname().machine not in ARCH:
        return f"the sandbox knows the syscalls of x86_64 and aarch64 only, not {os.uname().machine}"
    abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi >= 1:
        return abi
    if ctypes.get_errno() == 95:  # EOPNOTSUPP: built in, not enabled
        return ("Landlock is built into this kernel but not enabled (add landlock to its lsm= boot "
                "parameter): model-written code could write your files")
    return "the kernel has no Landlock (Linux 5.13+): model-written code could write your files"


def enter_namespaces():
    """New user, network, pid and IPC namespaces for this process's children; returns the flags
    that worked. Without a user namespace only root may create the others; with neither, 0."""
    others = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    for flags in (CLONE_NEWUSER | others, others):
        if libc.unshare(ctypes.c_int(flags)) == 0:
            return flags
    return 0


def set_limits(limits):
    """rlimits: CPU time (SIGXCPU at cpu_s, SIGKILL a second later), address space (allocations
    fail: MemoryError), file size (writes fail: EFBIG), no core files, open files, processes.
    Never raises a hard limit the parent already set lower. RLIMIT_NPROC does not bind root."""
    cpu = math.ceil(limits["cpu_s"])
    for res, soft, hard in [(resource.RLIMIT_CPU, cpu, cpu + 1),
                            (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
                            (resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"]),
                            (resource.RLIMIT_CORE, 0, 0),
                            (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
                            (resource.RLIMIT_NPROC, limits["processes"], limits["processes"])]:
        old = resource.getrlimit(res)[1]
        if old != resource.RLIM_INFINITY:
            soft, hard = min(soft, old), min(hard, old)
        resource.setrlimit(res, (soft, hard))


def drop_capabilities():
    """Empty effective, permitted and inheritable sets, then no_new_privs so that no exec (of a
    setuid file, or by root) brings them back. Matters when root runs without a user namespace."""
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(libc.capset(ctypes.create_string_buffer(header), ctypes.create_string_buffer(24)), "capset")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def landlock(directory, abi):
    """Handle every write-type filesystem right the ABI knows, allow them all beneath `directory`
    and WRITE_FILE on /dev/null; handle TCP bind/connect (no rule: all denied) and scope signals
    and abstract Unix sockets to the sandbox where the ABI has them. Reads and exec stay allowed
    (Python reads its standard library). Needs no_new_privs, which drop_capabilities set."""
    fs = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG
          | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM)
    fs |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", fs, net, scoped)[:8 if abi < 4 else 16 if abi < 6 else 24]  # the size this ABI knows
    ruleset = _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.create_string_buffer(attr),
                                  ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "landlock_create_ruleset")
    _landlock_allow(ruleset, directory, fs)
    _landlock_allow(ruleset, "/dev/null", FS_WRITE_FILE)
    _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
           "landlock_restrict_self")
    os.close(ruleset)


def _landlock_allow(ruleset, path, rights):
    """One path-beneath rule: `rights` on `path` (and beneath it, for a directory)."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr, packed: 12 bytes
        _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1),
                            ctypes.create_string_buffer(rule), ctypes.c_uint32(0)), f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def seccomp():
    """A seccomp filter: socket() of any family but AF_INET/AF_INET6, io_uring_setup, other syscall
    ABIs (x32, 32-bit) all fail with EPERM. Needs no_new_privs."""
    audit_arch, sys_socket = ARCH[os.uname().machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    program = [  # (code, jump if true, jump if false, k); a jump skips that many instructions
        (ld, 0, 0, 4),                       # 0: seccomp_data.arch
        (jeq, 0, 8, audit_arch),             # 1: not this ABI -> 10 deny
        (ld, 0, 0, 0),                       # 2: seccomp_data.nr
        (jge, 6, 0, 0x40000000),             # 3: x32 syscall -> 10 deny
        (jeq, 5, 0, SYS_IO_URING_SETUP),     # 4: -> 10 deny
        (jeq, 0, 3, sys_socket),             # 5: not socket() -> 9 allow
        (ld, 0, 0, 16),                      # 6: args[0], the family (low 32 bits, little-endian)
        (jeq, 1, 0, 2),                      # 7: AF_INET -> 9 allow
        (jeq, 0, 1, 10),                     # 8: not AF_INET6 -> 10 deny
        (ret, 0, 0, allow),                  # 9
        (ret, 0, 0, deny),                   # 10
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *op) for op in program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(filters))  # struct sock_fprog
    _check(libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(2), ctypes.create_string_buffer(fprog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl(PR_SET_SECCOMP)")


def confine(directory, limits, abi, namespaces):
    """Every layer, in order, on this process (the program), or Unconfined."""
    if not namespaces & CLONE_NEWNET and abi < 4:
        raise Unconfined("no network isolation: neither a network namespace (user namespaces are off and "
                         "this is not root) nor Landlock TCP rules (Linux 6.7+) are available")
    set_limits(limits)
    drop_capabilities()
    landlock(directory, abi)
    seccomp()


def run(directory):
    """Run directory/program.py as __main__; an uncaught exception prints its traceback (without
    this frame) and exits 1. SystemExit passes through."""
    path = os.path.join(directory, "program.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except SystemExit:
        raise
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)


def die_with_parent():
    """SIGKILL this process when the one that forked it dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "prctl(PR_SET_PDEATHSIG)")


def exit_like(status):
    """End this process the way the program ended: same exit code, or the same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        _prctl(PR_SET_DUMPABLE, 0, "prctl(PR_SET_DUMPABLE)")  # no core file for the relayed signal
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def fail(message):
    print(MESSAGE_PREFIX + message, file=sys.stderr, flush=True)
    os._exit(EXIT_UNCONFINED)


def main(directory, limits):
    """Fork the anchor and the program, wait for the program, kill the anchor (and so whatever the
    program left running), then exit as the program did."""
    abi = landlock_abi()
    if isinstance(abi, str):
        fail(abi)
    die_with_parent()
    namespaces = enter_namespaces()
    anchor = os.fork()
    if anchor == 0:
        die_with_parent()
        while True:
            signal.pause()
    program = os.fork()
    if program == 0:
        try:
            confine(directory, limits, abi, namespaces)
        except (Unconfined, OSError) as e:
            fail(f"the program was not run: {e}")
        run(directory)
        sys.exit(0)
    _, status = os.waitpid(program, 0)
    os.kill(anchor, signal.SIGKILL)
    os.waitpid(anchor, 0)
    exit_like(status)


if __name__ == "__main__":
    try:
        main(sys.argv[1], json.loads(sys.argv[2]))
    except Unconfined as e:
        fail(str(e))
