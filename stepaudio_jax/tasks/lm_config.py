"""Checks of the LM sections (model, tokens, vision, data, synthetic, train) that every task
training a Step1 model runs when its config loads."""

from stepaudio_jax.config import RunConfig
from stepaudio_jax.config.data import DataSource


def check_lm_config(cfg: RunConfig) -> None:
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
