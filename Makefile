# hydrabench: `make reproduce-table1` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= tiny
BIN := $(VENV)/bin
# torch goes in first: on CPU machines the pinned CPU build (on disk here, no download);
# with an NVIDIA driver, the default CUDA build plus vLLM.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch,torch==2.13.0)
comma := ,
EXTRAS := $(if $(HAS_GPU),dev$(comma)gpu,dev)
export HF_HUB_OFFLINE ?= $(if $(filter tiny,$(PROFILE)),1,0)
export HF_DATASETS_OFFLINE ?= $(HF_HUB_OFFLINE)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install reproduce-table1 report test lint bench clean

$(BIN)/hydrabench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/hydrabench

reproduce-table1: install
	$(BIN)/hydrabench reproduce table1 --profile $(PROFILE)

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf results/runs results/artifacts results/.locks reports/*.md reports/*.csv reports/*.tex
