"""Progress lines and TensorBoard events for long runs."""

import math
import time

from tensorboardX import SummaryWriter


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Turns fetched step metrics into a progress line (step, loss, tokens/s, MFU, ETA) and events.

  Only process 0 prints and writes events.
  """

  def __init__(self, log_dir: str, total_steps: int, flops_per_step: float, peak_flops: float,
               is_lead: bool, print_fn=print):
    self.total_steps, self.flops_per_step, self.peak_flops = total_steps, flops_per_step, peak_flops
    self.is_lead, self.print = is_lead, print_fn
    self.writer = SummaryWriter(log_dir) if is_lead else None
    self._last = None

  def start(self, step: int) -> None:
    self._last = (step, time.perf_counter())

  def log_train(self, step: int, metrics: dict[str, float], tokens_per_step: float) -> dict:
    """`step` is the number of optimizer steps done; returns the derived rates."""
    last_step, last_time = self._last
    now = time.perf_counter()
    dt = max(now - last_time, 1e-9) / max(step - last_step, 1)
    self._last = (step, now)
    rates = {
        "tokens_per_second": tokens_per_step / dt,
        "mfu": self.flops_per_step / dt / self.peak_flops if self.peak_flops else 0.0,
        "step_seconds": dt,
    }
    if self.is_lead:
      eta = format_duration((self.total_steps - step) * dt)
      self.print(
          f"step {step}/{self.total_steps} loss {metrics['loss']:.4f} "
          f"tok/s {rates['tokens_per_second']:,.0f} MFU {100 * rates['mfu']:.1f}% "
          f"grad_norm {metrics['grad_norm']:.3f} lr {metrics['learning_rate']:.2e} ETA {eta}",
          flush=True,
      )
      for k, v in {**metrics, **rates}.items():
        self.writer.add_scalar(f"train/{k}", v, step)
    return rates

  def log_eval(self, step: int, metrics: dict[str, float]) -> None:
    if self.is_lead:
      self.print(f"eval step {step} loss {metrics['loss']:.4f}", flush=True)
      for k, v in metrics.items():
        self.writer.add_scalar(f"eval/{k}", v, step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
