"""Checks of the LM sections (model, tokens, vision, data, synthetic, train, mesh) that every
task training a Step1 model runs when its config loads."""

import math

from stepaudio_jax.config import RunConfig
from stepaudio_jax.config.data import DataSource
from stepaudio_jax.config.mesh import MESH_AXES

# Step1 dimensions the mesh splits, with the logical axes (mesh.rules) each is split by: heads
# as parameters and inside attention (tensor x sequence), the MLP and the vocabulary.
SPLIT_DIMS = (("num_heads", ("heads", "act_attn_heads")),
              ("num_kv_heads", ("kv_heads", "act_attn_kv_heads")),
              ("intermediate_size", ("mlp",)), ("vocab_size", ("vocab",)))


def check_model_fits_mesh(cfg: RunConfig) -> None:
  """The mesh axes of set size (not -1) divide every Step1 dimension they split, as Step1's
  construction demands; checked at load, so a dry run (launch/submit.py) refuses it too. An
  axis of size -1 is only known with the devices, and Step1 checks it when it is built."""
  mesh = cfg.mesh
  sizes = dict(zip(MESH_AXES, (mesh.data, mesh.fsdp, mesh.sequence, mesh.tensor)))
  for field, rules in SPLIT_DIMS:
    dim = getattr(cfg.model, field)
    for rule in rules:
      axes = [a for a in mesh.rules.get(rule, []) if sizes[a] != -1]
      ways = math.prod(sizes[a] for a in axes)
      if dim % ways:
        split = " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)
        raise ValueError(f"model.{field}={dim} does not split over {split} (mesh.rules.{rule}: "
                         f"{ways} ways); choose mesh sizes whose product divides it")


def check_lm_config(cfg: RunConfig) -> None:
  check_model_fits_mesh(cfg)
  needed = cfg.tokens.min_vocab_size(cfg.vision.enabled)
  if cfg.model.vocab_size < needed:
    raise ValueError(
        f"model.vocab_size={cfg.model.vocab_size} is below the {needed} ids the token layout "
        "needs (tokens.text_vocab_size + audio codes, + 1 image placeholder with vision)")
  if cfg.synthetic.audio_weight and not (cfg.tokens.linguistic_codes
                                         and cfg.tokens.semantic_codes):
    raise ValueError("synthetic.audio_weight must be 0 for a model without audio codes")
  if cfg.train.seq_len > cfg.model.max_seq_len:
    raise ValueError(
        f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
  if cfg.vision.enabled and cfg.vision.tokens_per_image > cfg.train.seq_len:
    raise ValueError("vision.tokens_per_image does not fit in train.seq_len")
  data = cfg.data
  if data.source == DataSource.GRAIN and cfg.train.eval_every:
    missing = [t for t in data.live_tasks() if not data.eval_shards.get(t)
               and not (t == "text" and data.seqio_task)]
    if missing:
      raise ValueError(
          f"train.eval_every={cfg.train.eval_every} reads held-out data, but data.eval_shards "
          f"has no globs for {missing}; add them (e.g. the corpus' eval-* shards) or set "
          "train.eval_every=0")
