"""Check an export against the checkpoint it came from: the exported model in PyTorch (our
torch Step1 or reward model, or transformers' Llama for a rope LM) and `stepaudio score` on the
same tokens.

Needs the `export` extra (torch, transformers). Compared in float32: the largest absolute logit
difference and the largest per-token KL(ours || theirs); a bfloat16 export is loaded as float32,
so its difference is the rounding of the weights.
"""

import dataclasses
import json
import os

import numpy as np

from stepaudio_jax.export.orbax_reader import ExportError
from stepaudio_jax.export.score import score
from stepaudio_jax.export.step1_layout import LLAMA_ARCH, REWARD_ARCH, STEP1_ARCH

# Bounds a correct export stays well under (fp32 measured ~2e-6; bf16 weights ~1e-2 at toy size).
MAX_LOGIT_DIFF = {"float32": 1e-3, "bfloat16": 0.5}


@dataclasses.dataclass(frozen=True)
class Parity:
  max_logit_diff: float
  max_token_kl: float
  ok: bool


def check_export(checkpoint: str, out_dir: str, dtype: str, tokens: list[int], model: str = ""
                 ) -> Parity:
  try:
    import torch
  except ImportError as e:
    raise ExportError("--check needs torch: pip install -e '.[export]'") from e
  with open(os.path.join(out_dir, "config.json")) as f:
    arch = json.load(f)["architectures"][0]
  if arch == REWARD_ARCH:
    from stepaudio_jax.export.torch_step1 import Step1ForRewardModel

    rm = Step1ForRewardModel.from_pretrained(out_dir).float().eval()
    with torch.no_grad():
      theirs = rm(torch.tensor([tokens]))[0].numpy().astype(np.float64)
    diff = float(np.abs(score(checkpoint, tokens, model) - theirs).max())
    return Parity(diff, 0.0, diff < MAX_LOGIT_DIFF[dtype])
  if arch not in (STEP1_ARCH, LLAMA_ARCH):
    raise ExportError(f"--check compares LMs and reward models; {out_dir} holds a {arch} "
                      "(its PyTorch module is export/torch_speech.py)")
  if arch == LLAMA_ARCH:
    import transformers

    lm = transformers.LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  else:
    from stepaudio_jax.export.torch_step1 import Step1ForCausalLM

    lm = Step1ForCausalLM.from_pretrained(out_dir).float()
  with torch.no_grad():
    out = lm.eval()(torch.tensor([tokens]))
    theirs = (out.logits if hasattr(out, "logits") else out)[0].numpy().astype(np.float64)
  ours = score(checkpoint, tokens, model).astype(np.float64)
  lp = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
  lq = theirs - np.logaddexp.reduce(theirs, axis=-1, keepdims=True)
  kl = float((np.exp(lp) * (lp - lq)).sum(-1).max())
  diff = float(np.abs(ours - theirs).max())
  return Parity(diff, kl, diff < MAX_LOGIT_DIFF[dtype])
