"""Write the golden per-step metrics that tests/test_golden.py compares with.

Written by (corpus_50_steps.json again whenever data_pipelines/corpus is rebuilt):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python tests/golden/record.py
"""

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# (golden file, config, overrides); 8 emulated devices, the config's own mesh (fsdp=8).
RUNS = (
    ("tiny_50_steps.json", "configs/tiny.yaml", ["train.steps=50"]),
    ("corpus_50_steps.json", "configs/corpus.yaml", ["train.steps=50"]),
)
KEYS = ("loss", "grad_norm", "update_norm", "param_norm", "learning_rate")


def record(train_fn, load_config):
  for name, config, overrides in RUNS:
    with tempfile.TemporaryDirectory() as run_dir:
      cfg = load_config(os.path.join(REPO, config), [f"train.run_dir={run_dir}", *overrides,
                                                     "train.peak_flops_per_device=1e12"])
      history = train_fn(cfg, print_fn=lambda *a, **k: None)
    out = {"config": config, "overrides": overrides, "devices": 8,
           "steps": [{k: h[k] for k in ("step",) + KEYS} for h in history]}
    with open(os.path.join(HERE, name), "w") as f:
      json.dump(out, f, indent=1)
    print(name, [round(h["loss"], 4) for h in history[:3]], "...", history[-1]["loss"])


if __name__ == "__main__":
  os.chdir(REPO)
  sys.path.insert(0, REPO)
  from stepaudio_jax.tasks.registry import load_config
  from stepaudio_jax.training.trainer import train

  record(train, load_config)
