# Quick start: `make demo` and `make test`. Both create or update the local .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# make demo DATA=path/or/url/to/your/text.txt  trains on your own corpus instead
DATA   ?=
DEMO_SECONDS ?= 90

.PHONY: help venv demo test test-fast proto bench clean

help:
	@echo "make demo   - train a small char model for ~$(DEMO_SECONDS)s, export, serve it and stream text"
	@echo "make test   - run the test suite"
	@echo "make proto  - regenerate clients/lstmgen_client/v1 from proto/"

# torch==2.13.0 first: the local CPU wheel; the 'train' extra then pulls no CUDA packages.
$(STAMP): pyproject.toml clients/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e clients -e ".[cpu,train,dev,ray]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lstmgen.demo --seconds $(DEMO_SECONDS) $(if $(DATA),--data "$(DATA)")

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The descriptor keeps the repository's file name (lstmgen/v1/generator.proto): see tools/gen_proto.py
proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf .demo .pytest_cache
