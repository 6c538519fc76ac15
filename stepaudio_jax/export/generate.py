"""`stepaudio generate`: sample from a run's Step1 LM (what it delivers: a pretraining or SFT
run's LM, a PPO run's policy; or another LM of it with --model) with the KV-cache sampler.

The prompt is token ids, or plain text that the run's own tokenizer encodes after bos (not the
chat-turn format). The LM is read array by array like `score` (float32 parameters); it computes
in float32 or in the run's model.compute_dtype.
"""

import dataclasses
import time

import jax
from flax import nnx

from stepaudio_jax.data.tokenizer import make_tokenizer
from stepaudio_jax.export.orbax_reader import ExportError, ModelReader
from stepaudio_jax.export.score import load_lm
from stepaudio_jax.inference.decode import left_pad
from stepaudio_jax.inference.sampler import SamplingConfig, make_sampler
from stepaudio_jax.models.step1 import Step1


@dataclasses.dataclass(frozen=True)
class Generation:
  result: dict  # what `stepaudio generate` writes as JSON
  text: str | None  # a text prompt and its continuation, decoded together
  seconds: float  # prefill and decoding, without the compile
  compile_seconds: float


def generate(checkpoint: str, prompt: str | list[int], max_new_tokens: int = 32,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             no_repeat_ngram: int = 0, dtype: str = "float32", seed: int = 0,
             model: str = "") -> Generation:
  """Sample one continuation of `prompt` (text, or token ids) from `checkpoint` (a run or a step
  directory); `dtype` is "float32" or "run" (the run's model.compute_dtype)."""
  reader = ModelReader(checkpoint, model, "step1")
  run_cfg = reader.config
  ids = run_cfg.tokens
  try:
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, no_repeat_ngram,
                              eos_id=ids.eos_id, pad_id=ids.pad_id)
  except ValueError as e:
    raise ExportError(str(e)) from None
  tokenizer = None
  if isinstance(prompt, str):
    tokenizer = make_tokenizer(run_cfg.data.tokenizer_model, ids)
    prompt = [ids.bos_id, *tokenizer.encode(prompt)]
  vocab = run_cfg.model.vocab_size
  bad = [t for t in prompt if not 0 <= t < vocab]
  if not prompt or bad:
    raise ExportError(f"the prompt {'is empty' if not prompt else f'has ids {bad}'}: pass ids "
                      f"in [0, {vocab}), the vocabulary of {reader.checkpoint.run_dir}")

  longest = run_cfg.model.max_seq_len
  if len(prompt) + max_new_tokens > longest:
    raise ExportError(f"the prompt ({len(prompt)} ids) and --max-new-tokens {max_new_tokens} "
                      f"exceed the model's max_seq_len {longest}; shorten the prompt or lower "
                      "--max-new-tokens")
  lm = load_lm(reader.checkpoint.step_dir, reader.name)  # float32 parameters and compute
  params = nnx.to_pure_dict(nnx.state(lm))
  if dtype == "run":
    cfg = dataclasses.replace(lm.cfg, compute_dtype=run_cfg.model.compute_dtype)
    lm = nnx.eval_shape(lambda: Step1(cfg, rngs=nnx.Rngs(0)))
  prompts, key = left_pad([prompt], ids.pad_id), jax.random.key(seed)
  start = time.perf_counter()
  sample = make_sampler(lm).lower(params, prompts, sampling, key).compile()
  compile_s, start = time.perf_counter() - start, time.perf_counter()
  out = jax.device_get(sample(params, prompts, key))
  seconds = time.perf_counter() - start
  n = int(out.lengths[0])
  result = {
      "checkpoint": reader.checkpoint.step_dir, "step": reader.checkpoint.step,
      "model": reader.name, "prompt_tokens": prompt,
      "tokens": out.tokens[0, :n].tolist(), "logprobs": out.logprobs[0, :n].tolist(),
      "truncated": bool(out.truncated[0]), "compute_dtype": lm.cfg.compute_dtype.value,
      **dataclasses.asdict(sampling), "seed": seed,
  }
  text = None
  if tokenizer is not None:  # ids outside the text vocabulary (audio codes, EOS) are left out
    new = [t for t in result["tokens"] if t != ids.eos_id]
    result["text"] = tokenizer.decode(new)
    text = tokenizer.decode(prompt[1:] + new)  # whole, so the pieces' spaces survive
  return Generation(result, text, seconds, compile_s)
