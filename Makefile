# `make demo` and `make test` set up .venv themselves: they are all a new machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2
# No accelerator here: keep JAX off the TPU runtime that the test extra installs (for AOT checks).
ACCEL := $(shell ls /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | head -1; command -v nvidia-smi)
CPU_ONLY := $(if $(ACCEL),,JAX_PLATFORMS=cpu)

.PHONY: demo test test-slow post-train bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(CPU_ONLY) $(BIN)/stepaudio train configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q -m "not slow" tests

# Multi-process fault and end-to-end runs (minutes); CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q -m slow tests

# The post-training chain on the committed corpus (report section 5) at toy size on this CPU:
# pretraining, TTS SFT, AQTA SFT, the two-stage reward model, a short PPO (a few minutes).
post-train: $(STAMP)
	rm -rf runs/corpus runs/sft-corpus-tts runs/sft-corpus-aqta runs/reward-corpus runs/ppo-corpus
	$(BIN)/stepaudio train configs/corpus.yaml train.steps=100 train.eval_every=0
	$(BIN)/stepaudio train configs/sft/corpus_tts.yaml checkpoint.init_from=runs/corpus
	$(BIN)/stepaudio train configs/sft/corpus_aqta.yaml checkpoint.init_from=runs/corpus
	$(BIN)/stepaudio train configs/reward/corpus.yaml checkpoint.init_from=runs/sft-corpus-aqta
	$(BIN)/stepaudio train configs/ppo/corpus.yaml

bench: $(STAMP)
	$(CPU_ONLY) $(BIN)/python benchmarks/train_step.py configs/bench.yaml
	$(CPU_ONLY) $(BIN)/python benchmarks/train_step.py configs/bench.yaml model.position_encoding=rope

clean:
	rm -rf $(VENV) runs *.egg-info
