"""hydrabench.evaluation.sandbox: the limits hold against the escapes of issue 32 (item 7).

Each escape is tried by a real program in the real sandbox, through ctypes and raw system calls
(past the Python-level guard): pinning memory outside RLIMIT_AS with memfd_create + write or with
System V shared memory, filling a tmpfs mounted in a nested user namespace, and keeping a key in
the kernel keyring of the sandbox's uid for a later run to read. The program reports what it
managed as a plain value, which the judge's tests check, so a run passes only where the wall held.
Where bubblewrap cannot start, these tests skip with the sandbox's own one-line reason.
"""

import contextlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import children_now, sandboxes_started_since

from hydrabench.evaluation import sandbox

UNAVAILABLE = sandbox.unavailable_reason()
needs_walls = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

MEMORY_MB = 128
# More than the whole memory limit: without the wall, all of it ends up pinned.
PIN_MIB = 192

# System call numbers the tests' programs call through ctypes (no libc wrapper for the keyring).
SYSCALLS = {
    "x86_64": {"add_key": 248, "keyctl": 250, "clone": 56, "clone3": 435},
    "aarch64": {"add_key": 217, "keyctl": 219, "clone": 220, "clone3": 435},
}
needs_known_arch = pytest.mark.skipif(platform.machine() not in SYSCALLS,
                                      reason=f"no syscall numbers for {platform.machine()}")


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.OPT_IN_ENV, "1")


def outcome_of(program: str, **kwargs) -> str:
    """Run `program`, which sets the global `outcome`, and return that value as the judge saw it.

    The judge's test fails on purpose so that its assertion message carries `outcome` back.
    """
    result = sandbox.run_program(program, "assert False, 'outcome=%r' % (outcome,)\n", **kwargs)
    assert result.status == "failed", result.detail
    assert "outcome='" in result.detail, result.detail
    return result.detail.split("outcome='", 1)[1].split("'", 1)[0]


PRELUDE = (
    "import ctypes, errno, platform, posix\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"NR = {SYSCALLS!r}.get(platform.machine(), {{}})\n"
    "def failed(what):\n"
    "    return what + ' denied: ' + errno.errorcode[ctypes.get_errno()]\n"
)


@needs_walls
def test_memfd_pages_cannot_escape_the_memory_limit():
    # The program pinned 2.6 GB under memory_mb=256: write() to a memfd maps nothing, so
    # RLIMIT_AS never sees those pages. memfd_create is denied.
    program = PRELUDE + (
        "def pin():\n"
        "    chunk, fds = b'x' * (1 << 20), []\n"
        f"    for _ in range({PIN_MIB // 8}):\n"  # 8 MiB each, under RLIMIT_FSIZE
        "        try:\n            fds.append(posix.memfd_create('pin'))\n"
        "        except OSError as e:\n"
        "            return 'memfd_create denied: ' + errno.errorcode[e.errno]\n"
        "        for _ in range(8):\n            posix.write(fds[-1], chunk)\n"
        "    return 'pinned %d MiB' % sum(posix.fstat(fd).st_size >> 20 for fd in fds)\n"
        "outcome = pin()\n"
    )
    assert outcome_of(program, memory_mb=MEMORY_MB) == "memfd_create denied: EPERM"


@needs_walls
def test_sysv_shared_memory_cannot_escape_the_memory_limit():
    # A segment keeps its pages after shmdt, when RLIMIT_AS no longer counts them: attach, touch,
    # detach, repeat. shmget is denied.
    program = PRELUDE + (
        "libc.shmget.restype = ctypes.c_int\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "def pin():\n"
        "    total = 0\n"
        f"    for _ in range({PIN_MIB // 16}):\n"
        "        seg = libc.shmget(0, 16 << 20, 0o1600)\n"  # IPC_PRIVATE, IPC_CREAT | 0600
        "        if seg < 0:\n            return failed('shmget')\n"
        "        at = libc.shmat(seg, None, 0)\n"
        "        if at in (None, ctypes.c_void_p(-1).value):\n            return failed('shmat')\n"
        "        ctypes.memset(at, 120, 16 << 20)\n"
        "        libc.shmdt(ctypes.c_void_p(at))\n"
        "        total += 16\n"
        "    return 'pinned %d MiB' % total\n"
        "outcome = pin()\n"
    )
    assert outcome_of(program, memory_mb=MEMORY_MB) == "shmget denied: EPERM"


@needs_walls
def test_nested_user_namespace_cannot_mount_a_tmpfs_past_the_limit():
    # The program made a user namespace, mounted a tmpfs in it and filled 3.1 GB.
    program = PRELUDE + (
        "CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000\n"
        "def fill():\n"
        "    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:\n"
        "        return failed('unshare')\n"
        "    for name, text in (('setgroups', 'deny'), ('uid_map', '0 65534 1'),\n"
        "                       ('gid_map', '0 65534 1')):\n"  # files need mapped owners
        "        with open('/proc/self/' + name, 'w') as f:\n            f.write(text)\n"
        "    posix.mkdir('/tmp/big')\n"
        "    if libc.mount(b'none', b'/tmp/big', b'tmpfs', 0, b'size=1g') != 0:\n"
        "        return failed('mount')\n"
        "    chunk, total = b'x' * (1 << 20), 0\n"
        f"    for i in range({PIN_MIB // 8}):\n"  # 8 MiB files, under RLIMIT_FSIZE
        "        with open('/tmp/big/%d' % i, 'wb', buffering=0) as f:\n"
        "            for _ in range(8):\n                total += f.write(chunk)\n"
        "    return 'filled %d MiB' % (total >> 20)\n"
        "outcome = fill()\n"
    )
    assert outcome_of(program, memory_mb=MEMORY_MB) == "unshare denied: EPERM"


@needs_walls
@needs_known_arch
def test_no_clone_into_a_new_user_namespace():
    # The same namespace through clone's flags; clone3, whose flags a filter cannot read, is
    # answered ENOSYS, on which the C library falls back to clone.
    program = PRELUDE + (
        "libc.syscall.restype = ctypes.c_long\n"
        "def spawn():\n"
        "    answers = []\n"
        "    pid = libc.syscall(NR['clone'], 0x10000000 | 17, 0, 0, 0, 0)\n"  # | SIGCHLD
        "    if pid == 0:\n        posix._exit(0)\n"
        "    answers.append(failed('clone') if pid < 0 else 'clone made %d' % pid)\n"
        "    answers.append(failed('clone3') if libc.syscall(NR['clone3'], None, 0) < 0\n"
        "                   else 'clone3 ran')\n"
        "    child = posix.fork()\n"  # a plain fork still works
        "    if child == 0:\n        posix._exit(7)\n"
        "    status = posix.waitpid(child, 0)[1]\n"
        "    answers.append('fork exit %d' % posix.waitstatus_to_exitcode(status))\n"
        "    return '; '.join(answers)\n"
        "outcome = spawn()\n"
    )
    assert outcome_of(program) == "clone denied: EPERM; clone3 denied: ENOSYS; fork exit 7"


@needs_walls
@needs_known_arch
def test_a_key_added_in_one_run_is_gone_in_the_next():
    # The program added a key to the keyring of uid nobody, which a later run read back.
    description = f"hydrabench-test-{os.getpid()}-{time.monotonic_ns()}"
    add = PRELUDE + (
        "libc.syscall.restype = ctypes.c_long\n"
        f"key = libc.syscall(NR['add_key'], b'user', {description.encode()!r}, b'secret', 6,"
        " -4)\n"  # KEY_SPEC_USER_KEYRING
        "outcome = failed('add_key') if key < 0 else 'added'\n"
    )
    read = PRELUDE + (
        "libc.syscall.restype = ctypes.c_long\n"
        "def find():\n"
        f"    key = libc.syscall(NR['keyctl'], 10, -4, b'user', {description.encode()!r}, 0)\n"
        "    if key < 0:\n        return failed('keyctl')\n"  # KEYCTL_SEARCH, above: READ
        "    buf = ctypes.create_string_buffer(64)\n"
        "    size = libc.syscall(NR['keyctl'], 11, key, buf, 64)\n"
        "    return 'read back ' + buf.raw[:max(size, 0)].decode()\n"
        "outcome = find()\n"
    )
    # Both runs first: without the wall the second one shows the key read back.
    assert (outcome_of(add), outcome_of(read)) == ("add_key denied: EPERM", "keyctl denied: EPERM")


@needs_walls
def test_threads_and_processes_still_start():
    # pthread_create tries clone3 first: its ENOSYS must send the C library to clone, as it does.
    program = (
        "import posix, threading\n"
        "found = []\n"
        "worker = threading.Thread(target=lambda: found.append(6 * 7))\n"
        "worker.start()\nworker.join()\n"
        "child = posix.fork()\n"
        "if child == 0:\n    posix._exit(3)\n"
        "outcome = '%s %d' % (found, posix.waitstatus_to_exitcode(posix.waitpid(child, 0)[1]))\n"
    )
    assert outcome_of(program) == "[42] 3"


@needs_walls
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 system calls exist on x86_64")
def test_another_abi_kills_the_program():
    # x32 numbers (bit 30 set) reach the same kernel code under other numbers: no way around the
    # filter's table. getpid through x32 is killed by SIGSYS.
    program = (
        "import ctypes\n"
        "ctypes.CDLL(None).syscall(0x40000000 | 39)\n"
        "outcome = 'survived'\n"
    )
    result = sandbox.run_program(program, "assert False, outcome\n")
    assert (result.status, "SIGSYS" in result.detail) == ("error", True), result.detail


def test_seccomp_filter_is_built_for_known_machines_only():
    for machine in ("x86_64", "aarch64"):
        code = sandbox.seccomp_filter(machine)
        assert code is not None and len(code) % 8 == 0 and len(code) // 8 > 30
    assert sandbox.seccomp_filter("riscv64") is None


def test_unknown_machine_refuses_code_execution(monkeypatch):
    # No riscv64 machine here: platform.machine is made to say so (a fake).
    monkeypatch.setattr(sandbox.platform, "machine", lambda: "riscv64")
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **kw: f"/usr/bin/{name}")
    sandbox._probe_walls.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match=r"seccomp filter .* not riscv64"):
            sandbox.run_program("print('hi')")
    finally:
        sandbox._probe_walls.cache_clear()


@needs_walls
def test_socket_and_pipe_buffers_stay_small():
    # Unread data in kernel buffers is outside RLIMIT_AS: 2 GiB sat in unix socket pairs under
    # memory_mb=128 before RLIMIT_NOFILE was 64. Pipes may not grow past their default 64 KiB,
    # no Internet socket opens, and no Unix socket binds or listens (an abstract name).
    program = (
        "import _socket, fcntl, posix\n"
        "def flood():\n"
        "    pairs, total, chunk = [], 0, b'x' * 65536\n"
        "    try:\n"
        "        while total < (512 << 20):\n"
        "            a, b = _socket.socketpair()\n"
        "            a.setblocking(False)\n"
        "            pairs.append((a, b))\n"
        "            while True:\n"
        "                try:\n                    total += a.send(chunk)\n"
        "                except BlockingIOError:\n                    break\n"
        "    except OSError as e:\n"
        "        return '%d MiB, then errno %d' % (total >> 20, e.errno)\n"
        "    return '%d MiB' % (total >> 20)\n"
        "def attempt(call, *args):\n"
        "    try:\n        call(*args)\n        return 'ran'\n"
        "    except OSError as e:\n        return 'errno %d' % e.errno\n"
        "r, w = posix.pipe()\n"
        "unix = _socket.socket(_socket.AF_UNIX)\n"
        "outcome = '; '.join([flood(), attempt(fcntl.fcntl, w, 1031, 1 << 20),\n"  # F_SETPIPE_SZ
        "                     attempt(_socket.socket, _socket.AF_INET),\n"
        "                     attempt(unix.bind, '\\0hydrabench'), attempt(unix.listen)])\n"
    )
    flooded, setpipe, inet, bind, listen = outcome_of(program, memory_mb=MEMORY_MB).split("; ")
    mib, _, errno = flooded.partition(" MiB, then errno ")
    assert int(mib) <= 16 and errno == "24", flooded  # EMFILE: out of descriptors
    assert (setpipe, inet, bind, listen) == ("errno 1",) * 4


@needs_walls
def test_no_tcp_connection_to_itself_pins_kernel_buffers():
    # A socket whose connect() picks its own port as the source (the kernel gives connect() even
    # ports) opens a TCP connection to itself without bind or listen, whose unread data the
    # kernel buffers outside RLIMIT_AS: ~4 MiB a socket, ~250 MiB over 64 descriptors. Internet
    # sockets are denied: the namespace's loopback is all they could reach.
    program = (
        "import _socket, errno, time\n"
        "def pin():\n"
        "    held, total, deadline = [], 0, time.monotonic() + 3\n"
        "    for port in range(40000, 41000, 2):\n"
        "        while len(held) < 2 and time.monotonic() < deadline:\n"
        "            try:\n"
        "                s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        "            except OSError as e:\n"
        "                return 'socket denied: ' + errno.errorcode[e.errno]\n"
        "            try:\n                s.connect(('127.0.0.1', port))\n"
        "            except OSError:\n                s.close()\n                continue\n"
        "            held.append(s)\n            s.setblocking(False)\n"
        "            try:\n"
        "                while True:\n                    total += s.send(b'x' * 65536)\n"
        "            except BlockingIOError:\n                break\n"
        "    return 'pinned %d MiB on %d sockets' % (total >> 20, len(held))\n"
        "outcome = pin()\n"
    )
    assert outcome_of(program, timeout_s=10.0, memory_mb=MEMORY_MB) == "socket denied: EPERM"


def _sandbox_memory(seen: set, peak: list[int], children_before: set[int]) -> None:
    """Add the proportional set size (shared pages split between their processes) of every
    process the test started to `peak`'s running sum, keeping its highest value and, for a
    failure's message, which processes held it."""
    total, held = 0, []
    for proc in sandboxes_started_since(children_before):
        seen.add(proc.pid)
        with contextlib.suppress(psutil.Error):
            pss = proc.memory_full_info().pss
            total += pss
            held.append(f"{proc.name()} {proc.pid}: {pss >> 20} MiB")
    if total > peak[0]:
        peak[:] = [total, ", ".join(held)]


@needs_walls
def test_a_fork_bomb_holds_no_more_than_memory_mb_in_total():
    # Limits are per process: 32 children touching 24 MiB each held 768 MiB under memory_mb=128.
    # Measured from outside: the peak sum of the sandboxes' processes' memory, while they run.
    program = (
        "import posix, time\n"
        "for _ in range(32):\n"
        "    try:\n        pid = posix.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n"
        "        try:\n            block = b'x' * (24 << 20)\n"
        "        except MemoryError:\n            posix._exit(1)\n"
        "        time.sleep(60)\n"
        "time.sleep(60)\n"
    )
    results, seen, peak, before = [], set(), [0, ""], children_now()
    worker = threading.Thread(target=lambda: results.append(
        sandbox.run_program(program, "pass\n", timeout_s=3.0, memory_mb=MEMORY_MB)))
    worker.start()
    while worker.is_alive():
        _sandbox_memory(seen, peak, before)
        time.sleep(0.05)
    assert results[0].status == "timeout", results[0].detail
    assert len(seen) >= 4  # the harness saw both sandboxes and the program's processes
    assert peak[0] <= MEMORY_MB << 20, (
        f"{peak[0] >> 20} MiB held under memory_mb={MEMORY_MB} ({peak[1]})")


# Run as an unprivileged user: the sandbox's non-root path, then the programs each print one
# outcome line (what they managed) for the test to read.
UNPRIVILEGED_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ["HF_ALLOW_CODE_EVAL"] = "1"
from hydrabench.evaluation import sandbox
outcomes = {}
for name, program in json.loads(sys.argv[2]).items():
    result = sandbox.run_program(program, "assert False, 'outcome=%r' % (outcome,)\\n",
                                 memory_mb=int(sys.argv[3]))
    outcomes[name] = result.detail.split("outcome='", 1)[-1].split("'", 1)[0]
print(json.dumps([os.getuid(), outcomes]))
"""

UNPRIVILEGED_PROGRAMS = {
    # How many processes run at once (each stays until the run ends), and the memory each may have.
    "processes": (
        "import posix, time\n"
        "count = 1\n"
        "for _ in range(32):\n"
        "    try:\n        pid = posix.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(60)\n"
        "    count += 1\n"
        "limit = [l for l in open('/proc/self/limits') if l.startswith('Max address space')]\n"
        "outcome = '%d processes of %d MiB' % (count, int(limit[0].split()[3]) >> 20)\n"
    ),
    "internet socket": (
        "import _socket\n"
        "try:\n    _socket.socket(_socket.AF_INET)\n    outcome = 'created'\n"
        "except OSError as e:\n    outcome = 'errno %d' % e.errno\n"
    ),
    "user namespace": PRELUDE + (
        "outcome = failed('unshare') if libc.unshare(0x10000000) else 'made'\n"
    ),
}


def run_unprivileged(script: str, *args: str) -> str:
    """`script`'s output, run by Python as nobody (setpriv), or skip where none can run it."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and util-linux setpriv to become an unprivileged user")
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    why = "no Python here that nobody can run"
    # This interpreter, or the system's where nobody cannot reach this one's folder (/root).
    for python in dict.fromkeys([os.path.realpath(sys.executable), "/usr/bin/python3"]):
        if not os.path.isfile(python):
            continue
        run = subprocess.run([*drop, python, "-I", "-S", "-c", script, *args],
                             capture_output=True, text=True, timeout=120)
        if run.returncode == 0:
            return run.stdout
        why = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
        if "SandboxUnavailable" not in why and "PermissionError" not in why:
            raise AssertionError(run.stderr)
    pytest.skip(why)


@needs_walls
def test_the_unprivileged_path_keeps_the_whole_sandbox_limits():
    repo = str(Path(sandbox.__file__).resolve().parents[2])
    uid, outcomes = json.loads(run_unprivileged(
        UNPRIVILEGED_SCRIPT, repo, json.dumps(UNPRIVILEGED_PROGRAMS), str(MEMORY_MB)))
    assert uid == 65534
    per_process = MEMORY_MB // sandbox._PROCESSES
    assert outcomes == {
        "processes": f"{sandbox._PROCESSES} processes of {per_process} MiB",
        "internet socket": "errno 1",
        "user namespace": "unshare denied: EPERM",
    }


def kernel_syscall_numbers(header: Path) -> dict[str, int]:
    """`__NR_name` → number from a kernel header, aliases (`__NR_fcntl __NR3264_fcntl`) resolved."""
    defined = dict(re.findall(r"^#define __NR(?:3264)?_(\w+)\s+(\w+)", header.read_text(), re.M))
    aliases = dict(re.findall(r"^#define (__NR3264_\w+)\s+(\d+)", header.read_text(), re.M))
    return {name: int(aliases.get(value, value)) for name, value in defined.items()
            if aliases.get(value, value).isdigit()}


# The headers' tables: aarch64 has the generic one (asm-generic/unistd.h, linux-libc-dev).
HEADERS = {"x86_64": ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
                      "/usr/include/asm/unistd_64.h"],
           "aarch64": ["/usr/include/asm-generic/unistd.h"]}


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_syscall_tables_match_the_kernel_headers(machine):
    header = next((Path(p) for p in HEADERS[machine] if Path(p).is_file()), None)
    if header is None:
        pytest.skip(f"no kernel header with {machine}'s system call numbers here")
    kernel = kernel_syscall_numbers(header)
    arch, own = sandbox._SYSCALLS[machine]
    ours = {**own, **sandbox._UNIFIED}
    assert {name: kernel.get(name) for name in ours} == ours
    assert {name: kernel.get(name) for name in SYSCALLS[machine]} == SYSCALLS[machine]
    elf = {"x86_64": 62, "aarch64": 183}[machine]  # EM_X86_64, EM_AARCH64 (linux/elf-em.h)
    assert arch == elf | 0x80000000 | 0x40000000  # AUDIT_ARCH_*: 64-bit, little-endian


def run_filter(code: bytes, arch: int, nr: int, *args: int) -> int:
    """What the classic BPF program `code` answers for one system call (struct seccomp_data)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    program = [struct.unpack("=HBBI", code[i:i + 8]) for i in range(0, len(code), 8)]
    pc, accumulator = 0, 0
    while True:
        op, jt, jf, k = program[pc]
        pc += 1
        if op == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            accumulator = struct.unpack_from("=I", data, k)[0]
        elif op in (0x15, 0x35, 0x45):  # BPF_JMP | BPF_JEQ, JGE, JSET (with a constant)
            taken = {0x15: accumulator == k, 0x35: accumulator >= k,
                     0x45: bool(accumulator & k)}[op]
            pc += jt if taken else jf
        elif op == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"instruction {op:#x} the filter does not use")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_filter_answers_alike_on_both_machines(machine):
    # Only x86_64's filter runs here; both are read by an interpreter of their instructions, so
    # aarch64's answers the same calls as x86_64's (checked for real above) the same way.
    code, (arch, numbers) = sandbox.seccomp_filter(machine), sandbox._SYSCALLS[machine]
    getpid, allow, eperm = {"x86_64": 39, "aarch64": 172}[machine], 0x7FFF0000, 0x00050001
    numbers = {**numbers, **sandbox._UNIFIED}
    answers = {
        "getpid": run_filter(code, arch, getpid),
        "another machine's call": run_filter(code, arch ^ 1, getpid),
        "unix socket": run_filter(code, arch, numbers["socket"], 1),
        "internet sockets": {run_filter(code, arch, numbers["socket"], family)
                             for family in (2, 10, 16, 17)},  # INET, INET6, NETLINK, PACKET
        "thread": run_filter(code, arch, numbers["clone"], 0x3D0F00),
        "user namespace": run_filter(code, arch, numbers["clone"], 0x10000000 | 17),
        "clone3": run_filter(code, arch, numbers["clone3"]),
        "denied": {run_filter(code, arch, numbers[name]) for name in sandbox._DENIED},
        "SO_RCVBUF": run_filter(code, arch, numbers["setsockopt"], 3, 1, 8),
        "F_SETPIPE_SZ": run_filter(code, arch, numbers["fcntl"], 3, 1031),
    }
    assert answers == {
        "getpid": allow, "another machine's call": 0x80000000, "unix socket": allow,
        "internet sockets": {eperm}, "thread": allow, "user namespace": eperm,
        "clone3": 0x00050000 | 38, "denied": {eperm}, "SO_RCVBUF": eperm, "F_SETPIPE_SZ": eperm,
    }


@needs_walls
def test_sysv_message_queues_and_semaphores_cannot_hold_kernel_memory():
    # An IPC namespace allows 32000 message queues of 16 KiB: 62 MiB sat in 4000 of them under
    # memory_mb=128 (kernel memory, outside RLIMIT_AS); semaphore sets are kernel memory too.
    program = PRELUDE + (
        "def queue():\n"
        "    buf, total = ctypes.create_string_buffer(b'\\x01' + b'\\x00' * 8199), 0\n"
        "    for _ in range(4000):\n"
        "        queue = libc.msgget(0, 0o1600)\n"  # IPC_PRIVATE, IPC_CREAT | 0600
        "        if queue < 0:\n            return failed('msgget')\n"
        "        while libc.msgsnd(queue, buf, 8192, 0o4000) == 0:\n"  # IPC_NOWAIT
        "            total += 8192\n"
        "    return 'queued %d MiB' % (total >> 20)\n"
        "semaphores = libc.semget(0, 32000, 0o1600)\n"
        "outcome = queue() + '; ' + (failed('semget') if semaphores < 0 else 'semget made a set')\n"
    )
    assert outcome_of(program, timeout_s=20.0, memory_mb=MEMORY_MB) == \
        "msgget denied: EPERM; semget denied: EPERM"
