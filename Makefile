# `make demo` and `make test` set up .venv themselves: they are all a new machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2
# No accelerator here: keep JAX off the TPU runtime that the test extra installs (for AOT checks).
ACCEL := $(shell ls /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | head -1; command -v nvidia-smi)
CPU_ONLY := $(if $(ACCEL),,JAX_PLATFORMS=cpu)

.PHONY: demo demo-fast test test-slow bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The whole pipeline on the committed corpus (pretraining, SFT, reward model, PPO, export with
# the PyTorch check, generation, flow + vocoder, one WAV, a short ASR run with its held-out CER
# and one clip transcribed, a report), ~8 min on 2 cores;
# demo-fast: ~1 min, synthetic.
demo: $(STAMP)
	$(CPU_ONLY) $(BIN)/python -m stepaudio_jax.experiments.demo --out runs/demo

demo-fast: $(STAMP)
	$(CPU_ONLY) $(BIN)/python -m stepaudio_jax.experiments.demo --fast --out runs/demo-fast

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q -m "not slow" tests

# Multi-process fault and end-to-end runs (minutes); CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q -m slow tests

bench: $(STAMP)
	$(CPU_ONLY) $(BIN)/python benchmarks/train_step.py configs/bench.yaml
	$(CPU_ONLY) $(BIN)/python benchmarks/train_step.py configs/bench.yaml model.position_encoding=rope

clean:
	rm -rf $(VENV) runs *.egg-info

# The speech decoder at toy size on the corpus (about an hour on 2 busy cores):
# paired audio, flow and vocoder training, a TTS LM, the held-out evidence, one synthesis.
.PHONY: speech
speech: $(STAMP)
	$(BIN)/python -m data_pipelines.build_speech_pairs --out runs/speech_data
	$(CPU_ONLY) $(BIN)/stepaudio train configs/speech/flow_corpus.yaml
	$(CPU_ONLY) $(BIN)/stepaudio train configs/speech/vocoder_corpus.yaml
	$(CPU_ONLY) $(BIN)/stepaudio train configs/speech/tts_lm_tiny.yaml
	$(CPU_ONLY) $(BIN)/python -m stepaudio_jax.experiments.speech_evidence --flow runs/speech/flow \
	  --vocoder runs/speech/vocoder --pairs runs/speech_data/eval.safetensors \
	  --out runs/speech/flow/evidence --listen --lm runs/speech/tts-lm
	$(CPU_ONLY) $(BIN)/stepaudio synthesize "(English) three plus four is seven." \
	  --lm runs/speech/tts-lm --flow runs/speech/flow --vocoder runs/speech/vocoder \
	  --out runs/speech/synth.wav
