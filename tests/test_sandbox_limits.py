"""hydrabench.evaluation.sandbox: the limits hold against the escapes of issue 32 (item 7).

Each escape is tried by a real program in the real sandbox, through ctypes and raw system calls
(past the Python-level guard): pinning memory outside RLIMIT_AS with memfd_create + write or with
System V shared memory, filling a tmpfs mounted in a nested user namespace, and keeping a key in
the kernel keyring of the sandbox's uid for a later run to read. The program reports what it
managed as a plain value, which the judge's tests check, so a run passes only where the wall held.
Where bubblewrap cannot start, these tests skip with the sandbox's own one-line reason.
"""

import os
import platform
import time

import pytest

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
    # and no TCP listener or bound port exists (a loopback connection buffers megabytes).
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
        "tcp = _socket.socket()\n"
        "outcome = '; '.join([flood(), attempt(fcntl.fcntl, w, 1031, 1 << 20),\n"  # F_SETPIPE_SZ
        "                     attempt(tcp.bind, ('127.0.0.1', 0)), attempt(tcp.listen)])\n"
    )
    flooded, setpipe, bind, listen = outcome_of(program, memory_mb=MEMORY_MB).split("; ")
    mib, _, errno = flooded.partition(" MiB, then errno ")
    assert int(mib) <= 16 and errno == "24", flooded  # EMFILE: out of descriptors
    assert (setpipe, bind, listen) == ("errno 1", "errno 1", "errno 1")
