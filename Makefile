# Quick start: `make demo` and `make test`. Both create or update the local .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# make demo DATA=path/or/url/to/your/text.txt  trains on your own corpus instead
DATA   ?=
DEMO_SECONDS ?= 90
# make bench writes its figures here (docs/benchmark.md: the published ones live in docs/)
BENCH_OUT ?= bench-out
TORCH_INDEX ?=
BENCH_SECONDS ?= 8

.PHONY: help venv demo test test-fast proto bench clean

help:
	@echo "make demo   - train a small char model for ~$(DEMO_SECONDS)s, export, serve it and stream text"
	@echo "make test   - run the test suite"
	@echo "make test-fast - the test suite without the tests marked slow"
	@echo "make bench  - lstmgen bench: matmul ceiling, eager PyTorch, raw ORT and the server in one run (about a minute)"
	@echo "make proto  - regenerate clients/lstmgen_client/v1 from proto/"

# torch==2.13.0 first (the train extra's pin), so the extra pulls nothing more. From the public index
# on Linux that is the CUDA build; for a CPU-only machine: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
$(STAMP): pyproject.toml clients/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/pip install -q -e clients -e ".[cpu,train,dev,ray]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lstmgen.tools.demo --seconds $(DEMO_SECONDS) $(if $(DATA),--data "$(DATA)")

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The command of docs/benchmark.md, writing into $(BENCH_OUT) rather than over the published figures
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(BIN)/lstmgen bench --seconds $(BENCH_SECONDS) --json $(BENCH_OUT)/bench.json --plot $(BENCH_OUT)/bench.png --overwrite

# The descriptor keeps the repository's file name (lstmgen/v1/generator.proto): see tools/gen_proto.py
proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf .demo .pytest_cache $(BENCH_OUT)
