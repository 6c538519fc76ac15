"""Progress lines and TensorBoard events for long runs, and the peak FLOP/s that MFU divides by."""

import json
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

# bf16 dense matmul peaks, FLOP/s per device.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}
METRICS_FILE = "metrics.jsonl"
SHARE, TARGET = "data/share_", "data/target_"  # the loader's delivered and configured shares
# Short names in the progress line for metrics whose full names are long, and for rates.
SHORT_NAMES = {"learning_rate": "lr", "tokens": "tok"}


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of one large square matmul on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def device_peak_flops(override: float = 0.0) -> float:
  """Per-device bf16 peak: `override` if set, else the accelerator table, else measured (CPU)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  # CPU (emulated devices share the host): the host's measured peak split evenly.
  return measure_matmul_peak(1024) / jax.local_device_count()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _format(value: float) -> str:
  return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.4f}" if abs(value) < 10 else \
      f"{value:.3f}"


def _goodput_field(rates: dict) -> str:
  """"goodput 93% (data 2% compile 5%)": the step share and the other phases above 1%."""
  wall = sum(v for k, v in rates.items() if k.startswith("time/"))
  lost = [f"{k[5:-8]} {v / wall:.0%}" for k, v in rates.items()
          if k.startswith("time/") and k != "time/step_seconds" and wall and v / wall >= 0.01]
  return f"goodput {rates['goodput']:.0%}" + (f" ({' '.join(lost)})" if lost else "")


class Progress:
  """Turns fetched step metrics into a progress line (step, the task's headline metrics, its
  throughput in `unit`/s, MFU, ETA), TensorBoard events, and lines of RUN_DIR/metrics.jsonl
  ({"kind": "train" | "eval", "step", "seconds" since this process started, metrics...}: what
  `stepaudio report` reads). Only process 0 prints and writes. With `times` (goodput.StepTimes)
  each train line also carries the seconds per phase since the last one (time/data_seconds,
  time/compile_seconds, ...), goodput (the step share of them) and goodput_total. The rate is
  `<unit>_per_second` there (`tokens_per_second` for LM tasks), "tok/s" on the line for tokens.
  """

  def __init__(self, run_dir: str, total_steps: int, items_per_step: float, unit: str,
               flops_per_step: float, peak_flops: float, keys: Sequence[str], is_lead: bool,
               print_fn=print, times=None):
    self.times = times
    self.total_steps, self.items_per_step, self.unit = total_steps, items_per_step, unit
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self.keys, self.is_lead, self.print = tuple(keys), is_lead, print_fn
    self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard")) if is_lead else None
    self.jsonl = open(os.path.join(run_dir, METRICS_FILE), "a") if is_lead else None
    self._begin = time.perf_counter()
    self._last = None

  def _record(self, kind: str, step: int, metrics: dict) -> None:
    line = {"kind": kind, "step": step, "seconds": time.perf_counter() - self._begin, **metrics}
    self.jsonl.write(json.dumps(line) + "\n")
    self.jsonl.flush()

  def start(self, step: int) -> None:
    self._last = (step, time.perf_counter())

  def log_train(self, step: int, metrics: dict[str, float]) -> dict:
    """`step` is the number of optimizer steps done; returns the derived rates."""
    last_step, last_time = self._last
    now = time.perf_counter()
    dt = max(now - last_time, 1e-9) / max(step - last_step, 1)
    self._last = (step, now)
    rate = f"{self.unit}_per_second"
    rates = {
        rate: self.items_per_step / dt,
        "mfu": self.flops_per_step / dt / self.peak_flops if self.peak_flops else 0.0,
        "step_seconds": dt,
    }
    if self.times is not None:
      rates |= self.times.interval()
    if self.is_lead:
      head, *rest = [k for k in self.keys if k in metrics]
      fields = [f"{head} {metrics[head]:.4f}"]
      if self.items_per_step:
        fields.append(f"{SHORT_NAMES.get(self.unit, self.unit)}/s {rates[rate]:,.0f}")
      if self.flops_per_step:
        fields.append(f"MFU {100 * rates['mfu']:.1f}%")
      fields += [f"{SHORT_NAMES.get(k, k)} {_format(metrics[k])}" for k in rest]
      # A mixture's delivered token shares of the stage beside their (non-zero) targets.
      shares = [f"{k[len(SHARE):]} {v:.3f}/{metrics[TARGET + k[len(SHARE):]]:.3f}"
                for k, v in metrics.items()
                if k.startswith(SHARE) and metrics.get(TARGET + k[len(SHARE):], 0) > 0]
      if len(shares) > 1:
        fields.append("shares " + " ".join(shares))
      if self.times is not None:
        fields.append(_goodput_field(rates))
      eta = format_duration((self.total_steps - step) * dt)
      self.print(f"step {step}/{self.total_steps} {' '.join(fields)} ETA {eta}", flush=True)
      for k, v in {**metrics, **rates}.items():
        self.writer.add_scalar(f"train/{k}", v, step)
      self._record("train", step, {**metrics, **rates})
    return rates

  def log_eval(self, step: int, metrics: dict[str, float]) -> None:
    if self.is_lead:
      head = next((k for k in (*self.keys, "loss") if k in metrics), next(iter(metrics)))
      self.print(f"eval step {step} {head} {metrics[head]:.4f}", flush=True)
      for k, v in metrics.items():
        self.writer.add_scalar(f"eval/{k}", v, step)
      self._record("eval", step, metrics)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.jsonl.close()
