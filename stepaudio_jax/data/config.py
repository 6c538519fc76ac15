"""The `data` section of the run config: which source, which shards, which mixture when.

`source: synthetic` (the default) keeps the deterministic synthetic batches; `source: grain`
reads ArrayRecord shards of `records.Example`s, mixes them per stage and packs them. The text
component may instead read a registered seqio Task (`seqio_task`, seqio_source.py).
"""

import dataclasses

from stepaudio_jax.data.records import TASKS

AUDIO_TASKS = ("audio_continuation", "audio_text_interleaved", "asr", "tts", "aqta")
MODALITY_OF_TASK = {"text": "text", "image_text": "image", **{t: "audio" for t in AUDIO_TASKS}}
CODEBOOKS = ("dual", "semantic", "linguistic")
SEQIO_IDS = ("retokenize", "task")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One pretraining stage: its token budget and its mixture as shares of TOKENS.

  Modality weights split the stage's tokens into audio:text:image; the audio task weights split
  the audio share between the audio tasks (report: stage 1 continuation only, stage 2
  continuation:interleaved 1:1, stage 3 continuation:interleaved:ASR:TTS 1:1:1:1). `aqta`
  (audio question, text answer) is the AQTA SFT data, e.g. a stage with audio: 1, text: 0,
  image: 0, continuation: 0, aqta: 1.
  """

  tokens: float = 0.0  # training tokens (batch x seq_len per step) in this stage; 0 = to the end
  audio: float = 2.0
  text: float = 1.0
  image: float = 1.0
  continuation: float = 1.0
  interleaved: float = 0.0
  asr: float = 0.0
  tts: float = 0.0
  aqta: float = 0.0

  def __post_init__(self):
    if self.tokens < 0 or min(self.modality_weights().values()) < 0:
      raise ValueError("stage tokens and weights must be >= 0")
    if min(self.audio_task_weights().values()) < 0:
      raise ValueError("stage audio task weights must be >= 0")

  def modality_weights(self) -> dict[str, float]:
    return {"audio": self.audio, "text": self.text, "image": self.image}

  def audio_task_weights(self) -> dict[str, float]:
    return dict(zip(AUDIO_TASKS,
                    (self.continuation, self.interleaved, self.asr, self.tts, self.aqta)))

  def task_weights(self) -> dict[str, float]:
    """Token share of every task (summing to 1 over the tasks with a positive share)."""
    modal = self.modality_weights()
    audio = self.audio_task_weights()
    audio_sum = sum(audio.values())
    out = {t: 0.0 for t in TASKS}
    out["text"], out["image_text"] = modal["text"], modal["image"]
    if modal["audio"] > 0:
      if audio_sum <= 0:
        raise ValueError("a stage with audio weight > 0 needs an audio task weight > 0")
      for t, w in audio.items():
        out[t] = modal["audio"] * w / audio_sum
    total = sum(out.values())
    if total <= 0:
      raise ValueError("every stage needs a positive weight")
    return {t: w / total for t, w in out.items()}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"  # synthetic | grain
  shards: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # task -> globs
  stages: list[StageConfig] = dataclasses.field(default_factory=lambda: [StageConfig()])
  codebooks: str = "dual"  # dual | semantic | linguistic (single-codebook ablation)
  skip_malformed: bool = False  # skip + count bad records instead of stopping the run
  pack_lookahead: int = 8  # segments that may wait for a later row (first-fit packing)
  workers: int = 0  # grain mp_prefetch worker processes per JAX process (0 = in-process)
  tokenizer_model: str = ""  # sentencepiece model; "" = byte-level fallback tokenizer
  asr_prompt: str = "Transcribe the speech."  # ASR system prompt
  # TTS system prompt; {speaker} comes from the example's metadata
  tts_prompt: str = "Speaker {speaker}; tags: emotion, language, dialect, style, speed."
  aqta_prompt: str = "You are a helpful voice assistant. Answer the user in text."
  # A registered seqio Task read as the text component instead of shards["text"] (needs the
  # `seqio` extra): its split's `seqio_feature`, ids re-encoded with our tokenizer or kept.
  seqio_task: str = ""
  seqio_module: str = ""  # module imported first, to register the Task (e.g. my_project.tasks)
  seqio_split: str = "train"
  seqio_feature: str = "targets"
  seqio_ids: str = "retokenize"  # retokenize (decode, encode with ours) | task (keep its ids)
  eval_seed_offset: int = 1_000_003  # eval rows come from another shuffle of the same shards

  def __post_init__(self):
    if self.source not in ("synthetic", "grain"):
      raise ValueError(f"data.source must be synthetic or grain, got {self.source!r}")
    if self.codebooks not in CODEBOOKS:
      raise ValueError(f"data.codebooks must be one of {CODEBOOKS}, got {self.codebooks!r}")
    if self.pack_lookahead < 1:
      raise ValueError("data.pack_lookahead must be >= 1")
    if self.workers < 0:
      raise ValueError("data.workers must be >= 0")
    if self.seqio_ids not in SEQIO_IDS:
      raise ValueError(f"data.seqio_ids must be one of {SEQIO_IDS}, got {self.seqio_ids!r}")
    if self.seqio_task and self.shards.get("text"):
      raise ValueError("data.seqio_task replaces data.shards.text; set only one of them")
    unknown = set(self.shards) - set(TASKS)
    if unknown:
      raise ValueError(f"data.shards has unknown tasks {sorted(unknown)}; tasks are {TASKS}")
    if not self.stages:
      raise ValueError("data.stages needs at least one stage")
    if self.source == "grain":
      for i, stage in enumerate(self.stages):
        for task, w in stage.task_weights().items():
          if w > 0 and not self.shards.get(task) and not (task == "text" and self.seqio_task):
            raise ValueError(f"data.stages[{i}] gives task {task!r} a share but data.shards has "
                             f"no {task} globs; add them or set its weight to 0")
