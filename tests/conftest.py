"""Every in-process test sees 8 emulated CPU devices; subprocess tests set their own count."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs persist across tests, xdist workers and the trainer subprocesses they start
# (keyed by the program, devices and flags): most tests compile the same few tiny steps.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "stepaudio_jax_test_xla_cache"))

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step0_params(config: str, *overrides: str) -> dict:
  """The parameters a run of `config` starts from (after checkpoint.init_from), as host arrays."""
  from stepaudio_jax.tasks.base import Split
  from stepaudio_jax.tasks.registry import load_config
  from stepaudio_jax.training.checkpoint import Checkpointer
  from stepaudio_jax.training.setup import setup
  from stepaudio_jax.training.trainer import initial_state

  cfg = load_config(config, list(overrides))
  run = setup(cfg)
  ckpt = Checkpointer(cfg.train.run_dir, cfg.checkpoint)
  try:
    state = initial_state(run, ckpt, run.task.make_source(Split.TRAIN), say=lambda *a, **k: None)
  finally:
    ckpt.close()
  return jax.device_get(state.params)
