# Offline LLM appliance: developer entry points. `make` alone prints this help.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
EXTRAS ?= llama,default-model,onnx,rwkv,dev
CONFIG ?=
PYTEST_ARGS ?=

# llama-cpp-python compiles llama.cpp. On x86 the default "native" build picks the AMX path on some CPUs and
# segfaults; build for AVX2 instead (see DEVELOPERS.md). On ARM the native build is right (NEON, dotprod, i8mm).
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
else
LLAMA_CMAKE_ARGS ?=
endif

.PHONY: help run test test-fast bench bench-rwkv lint clean

help: ## show this help
	@echo "make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "variables: CONFIG=file.toml (run), PYTEST_ARGS='-k mqtt' (test), NO_APT=1 (never apt-get install)"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

run: $(BIN)/.installed ## set up and serve the embedded default model over MQTT and HTTP
	@scripts/ensure-mosquitto || true
	$(BIN)/appliance serve $(if $(CONFIG),-c $(CONFIG))

test: $(BIN)/.installed ## run the whole test suite (real mosquitto, real llama.cpp, tiny + default models)
	@scripts/ensure-mosquitto --required
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(BIN)/.installed ## unit tests only (no broker, no models)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: $(BIN)/.installed ## benchmark against raw llama-cpp-python and its server; writes docs/benchmarks.md
	@scripts/ensure-mosquitto --required
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.run --out docs/benchmarks.md

bench-rwkv: $(BIN)/.installed ## the RWKV backend vs the rwkv package per strategy; writes docs/benchmarks-rwkv.md
	$(BIN)/python -m bench.rwkv_strategies --out docs/benchmarks-rwkv.md

lint: $(BIN)/.installed ## ruff
	$(BIN)/ruff check appliance tests bench image

clean: ## remove the venv and caches (not the state directory)
	rm -rf $(VENV) .pytest_cache .ruff_cache
