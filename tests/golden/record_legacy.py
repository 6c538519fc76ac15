"""Write tests/golden/legacy_run: a run directory whose checkpoint (step 2) was written by the
trainer before the training core became tasks (main at dc4cb41), and the metrics of steps 3-4
of the same run uninterrupted. tests/test_legacy_checkpoint.py resumes, exports and
init_from's it with today's code.
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python tests/golden/record_legacy.py
"""

import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "legacy_run")
# A smaller tiny Step-Omni (the checkpoint is committed), saved on data=2 fsdp=2 tensor=2.
OVERRIDES = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2",
             "model.num_kv_heads=2", "vision.hidden_size=16", "vision.intermediate_size=32",
             "train.seq_len=64", "train.peak_flops_per_device=1e12", "optimizer.warmup_steps=2",
             "optimizer.decay_steps=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
             "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.async_save=false"]
KEYS = ("loss", "grad_norm", "update_norm", "param_norm", "learning_rate")

if __name__ == "__main__":
  os.chdir(REPO)
  sys.path.insert(0, REPO)
  from stepaudio_jax.config import dump_config, load_config
  from stepaudio_jax.training.trainer import train

  tiny = os.path.join(REPO, "configs", "tiny.yaml")
  with tempfile.TemporaryDirectory() as full:
    history = train(load_config(tiny, [f"train.run_dir={full}", "train.steps=4", *OVERRIDES]),
                    print_fn=lambda *a, **k: None)
  shutil.rmtree(OUT, ignore_errors=True)
  cfg = load_config(tiny, ["train.run_dir=RUN_DIR", "train.steps=2", *OVERRIDES])
  train(load_config(tiny, [f"train.run_dir={OUT}", "train.steps=2", *OVERRIDES]),
        print_fn=lambda *a, **k: None)
  shutil.rmtree(os.path.join(OUT, "tensorboard"))
  dump_config(cfg, os.path.join(OUT, "config.yaml"))
  with open(os.path.join(OUT, "uninterrupted.json"), "w") as f:
    json.dump({"overrides": OVERRIDES, "steps": [{k: h[k] for k in ("step",) + KEYS}
                                                 for h in history]}, f, indent=1)
  print([h["loss"] for h in history])
