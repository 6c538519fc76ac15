"""Supervised fine-tuning (report section 5): TTS, AQTA and ASR on chat-format records.

The model, loss and optimizer are pretraining's (tasks/pretrain.py): next-token cross-entropy
on packed rows. What makes it SFT is the data: `tts`, `aqta` and `asr` records rendered by
data/templates.py, whose loss masks keep only the learned turn (the TTS target audio, the last
AQTA answer, the ASR transcript), read from shards through the Grain loader; `train.epochs`
passes over them decide the run's length; `checkpoint.init_from` names the pretrained (or
earlier SFT) run to start from. Each shard's records must be of the task it is listed for.

Length: with train.epochs > 0 the epochs decide and train.steps does not apply, so a config
that sets train.steps in the same layer as train.epochs or a later one (`train.steps=4` on
the command line of an epoch-based config) is refused, naming both keys; a train.steps
inherited from a base below the layer that sets train.epochs is overridden by it. With
train.epochs=0, train.steps decides.
"""

from stepaudio_jax.config.data import DataSource
from stepaudio_jax.data.loader import GrainLoader
from stepaudio_jax.tasks.pretrain import PretrainTask

SFT_TASKS = ("tts", "aqta", "asr")


class SFTTask(PretrainTask):
  @classmethod
  def check_config(cls, cfg):
    super().check_config(cfg)
    other = [t for t in cfg.data.live_tasks() if t not in SFT_TASKS]
    if cfg.data.source != DataSource.GRAIN or other:
      raise ValueError(
          f"task=sft trains on chat records ({', '.join(SFT_TASKS)}) read from shards: set "
          f"data.source=grain and give only those tasks a share in data.stages (now: source "
          f"{cfg.data.source.value}, other tasks {other})")

  @classmethod
  def length_keys(cls, cfg):
    return ("train.epochs",) if cfg.train.epochs else ()

  def total_steps(self) -> int:
    tc = self.cfg.train
    if not tc.epochs:
      return tc.steps
    loader = GrainLoader(self.cfg.data, self.cfg.tokens, self.cfg.vision, tc.seq_len,
                         tc.batch_size, tc.seed)
    return loader.steps_for_epochs(tc.epochs)
