"""The whole train step compiles ahead of time for a TPU slice on this CPU (libtpu, no chips)."""

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'jax[tpu]' (extra: tpu)")

from stepaudio_jax.tasks.registry import load_config  # noqa: E402
from stepaudio_jax.training.aot import compile_train_step  # noqa: E402


def test_tiny_step_compiles_for_v5p_and_fits():
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=2", "mesh.tensor=2"])
  report, _ = compile_train_step(cfg, "v5p:2x2x1")
  assert report.chips == 4 and report.mesh == {"data": 1, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert report.fits and 0 < report.bytes_per_chip < report.hbm_per_chip
  assert report.xla_flops > 0


def test_pallas_attention_inside_the_compiled_step():
  """With attention=pallas the model's attention is a Mosaic kernel call in the TPU program."""
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=2", "mesh.tensor=2", "model.attention=pallas"])
  _, compiled = compile_train_step(cfg, "v5p:2x2x1")
  assert "tpu_custom_call" in compiled.as_text()
