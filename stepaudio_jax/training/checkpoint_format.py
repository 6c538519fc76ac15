"""The layout number a checkpoint's data item carries, and the refusal of any other.

Apart from checkpoint.py (which imports JAX and Orbax) so the exporter, which reads checkpoints
with TensorStore alone, checks the same number without importing either.
"""

LAYOUT = 2


def refusal(step_dir: str, data: dict) -> str | None:
  """Why the step at `step_dir`, whose data item is `data`, is not one this version reads; None
  if it is."""
  if data.get("layout") == LAYOUT:
    return None
  found = f"layout {data['layout']!r}" if "layout" in data else "no layout"
  return (f"{step_dir} was not written by this version of stepaudio_jax (its data item has "
          f"{found}; this version reads layout {LAYOUT})")
