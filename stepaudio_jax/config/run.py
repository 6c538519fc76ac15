"""RunConfig: every section of a run, and the checks that span sections."""

import dataclasses

from stepaudio_jax.config.data import DataConfig, DataSource, SyntheticConfig
from stepaudio_jax.config.mesh import MeshConfig
from stepaudio_jax.config.model import Step1Config, TokenLayout, VisionConfig
from stepaudio_jax.config.speech import FlowConfig, MelConfig, SpeechDataConfig, VocoderConfig
from stepaudio_jax.config.tasks import PPOConfig, PretrainConfig, RewardConfig
from stepaudio_jax.config.training import CheckpointConfig, OptimizerConfig, TrainConfig

# The task registry: each `task:` name and the class that implements it, by import path, so the
# schema checks names without importing training code (tasks/registry.py imports the class).
# A new task is its file in stepaudio_jax/tasks/ plus its line here (and, if it has options,
# its section: a dataclass in config/tasks.py and a field of RunConfig named like the task).
TASK_REGISTRY = {
    "pretrain": "stepaudio_jax.tasks.pretrain:PretrainTask",  # Step-Omni next-token pretraining
    "sft": "stepaudio_jax.tasks.sft:SFTTask",  # TTS / AQTA / ASR fine-tuning on chat records
    "reward": "stepaudio_jax.tasks.reward:RewardTask",  # Bradley-Terry reward model
    "ppo": "stepaudio_jax.tasks.ppo:PPOTask",  # PPO with a critic against the reward model
    "flow": "stepaudio_jax.tasks.flow:FlowTask",  # codes -> mel, conditional flow matching
    "vocoder": "stepaudio_jax.tasks.vocoder:VocoderTask",  # mel -> waveform, HiFi-GAN
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  task: str = "pretrain"  # a name in TASK_REGISTRY
  model: Step1Config = dataclasses.field(default_factory=Step1Config)
  tokens: TokenLayout = dataclasses.field(default_factory=TokenLayout)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
  reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
  ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
  mel: MelConfig = dataclasses.field(default_factory=MelConfig)
  speech_data: SpeechDataConfig = dataclasses.field(default_factory=SpeechDataConfig)
  flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)
  vocoder: VocoderConfig = dataclasses.field(default_factory=VocoderConfig)

  def __post_init__(self):
    if self.task not in TASK_REGISTRY:
      raise ValueError(f"task={self.task!r} is not a registered task; known tasks: "
                       f"{sorted(TASK_REGISTRY)} (stepaudio_jax/config/run.py:TASK_REGISTRY)")
    needed = self.tokens.min_vocab_size(self.vision.enabled)
    if self.model.vocab_size < needed:
      raise ValueError(
          f"model.vocab_size={self.model.vocab_size} is below the {needed} ids the token layout "
          "needs (tokens.text_vocab_size + audio codes, + 1 image placeholder with vision)"
      )
    if self.synthetic.audio_weight and not (self.tokens.linguistic_codes
                                            and self.tokens.semantic_codes):
      raise ValueError("synthetic.audio_weight must be 0 for a model without audio codes")
    if self.train.seq_len > self.model.max_seq_len:
      raise ValueError(
          f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
      )
    if self.vision.enabled and self.vision.tokens_per_image > self.train.seq_len:
      raise ValueError("vision.tokens_per_image does not fit in train.seq_len")
    data = self.data
    if data.source == DataSource.GRAIN and self.train.eval_every:
      missing = [t for t in data.live_tasks() if not data.eval_shards.get(t)
                 and not (t == "text" and data.seqio_task)]
      if missing:
        raise ValueError(
            f"train.eval_every={self.train.eval_every} reads held-out data, but data.eval_shards "
            f"has no globs for {missing}; add them (e.g. the corpus' eval-* shards) or set "
            "train.eval_every=0")
