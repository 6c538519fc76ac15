"""The decoder's code stream: the report's 2:3 groups of linguistic and semantic codes as one
stream of ids 0..5119, and the samples one 120 ms group spans."""

import numpy as np
from jaxtyping import Int

LINGUISTIC_CODES = 1024
GROUP_SECONDS = 0.12  # 2 linguistic (60 ms) + 3 semantic (40 ms) codes


def interleave_codes(linguistic: Int[np.ndarray, " L"], semantic: Int[np.ndarray, " S"]
                     ) -> Int[np.ndarray, " N"]:
  """One stream of whole 2:3 groups: [l0 l1 s0 s1 s2, ...], semantic shifted by 1024."""
  groups = min(len(linguistic) // 2, len(semantic) // 3)
  return np.concatenate([np.asarray(linguistic[:2 * groups]).reshape(groups, 2),
                         np.asarray(semantic[:3 * groups]).reshape(groups, 3) + LINGUISTIC_CODES],
                        axis=1).reshape(-1).astype(np.int32)


def group_samples(sample_rate: int) -> int:
  """Samples of one 120 ms code group (2646 at 22,050 Hz)."""
  samples = GROUP_SECONDS * sample_rate
  if abs(samples - round(samples)) > 1e-6:
    raise ValueError(f"a 120 ms code group is not a whole number of samples at {sample_rate} Hz")
  return round(samples)
