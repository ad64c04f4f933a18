# Two commands do everything (README "Quick start"):
#   make demo   set up, then run `validator demo` (simulated hosts, the real daemon)
#   make test   set up, then run the tests (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama.cpp (the independent honest engine) is built from source. Its AMX kernels for
# batched prompts disagree with single-token decoding on this CPU family (KL 0.64 vs
# 0.003 nats per token, measured), so build for AVX2 without AMX.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: setup setup-browser setup-tools demo test test-slow calibrate bench
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# No GPU: the CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
	command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip show llama-cpp-python 2>/dev/null | grep -q '^Version: 0.3.16$$' || \
		CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install -q --no-cache-dir "llama-cpp-python==0.3.16"
	# Every extra: the daemon (core), web, demo, bench, gpu and the tests' own.
	$(BIN)/pip install -q -e ".[web,demo,bench,gpu,test]"
	touch $@

demo: setup
	$(BIN)/validator demo

# Browser tests (dashboard, bench reports) drive Debian's chromium through Playwright;
# no Playwright browser download is needed.
setup-browser:
	command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Tools the tests run on what `validator init` writes: promtool (Debian's prometheus
# package) checks the alert and recording rules, systemd-analyze the units.
setup-tools:
	command -v promtool >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus systemd >/dev/null; }

test: setup setup-browser setup-tools
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

calibrate: setup
	$(BIN)/validator calibrate --model smollm2-135m

bench: setup
	$(BIN)/python benchmarks/audit_speed.py
	$(BIN)/python benchmarks/client_throughput.py
	$(BIN)/python benchmarks/daemon_overhead.py
	$(BIN)/python benchmarks/history_growth.py
