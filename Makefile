# `make demo` and `make test` set up .venv themselves: they are all a new machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/stepaudio train configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py configs/bench.yaml
	$(BIN)/python benchmarks/train_step.py configs/bench.yaml model.position_encoding=rope

clean:
	rm -rf $(VENV) runs *.egg-info
