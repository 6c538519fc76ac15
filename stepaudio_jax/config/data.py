"""Data sections: `data` (which source, which shards, which mixture when) and `synthetic`.

`source: synthetic` (the default) keeps the deterministic synthetic batches; `source: grain`
reads ArrayRecord shards of records, mixes them per stage and packs them. The text component
may instead read a registered seqio Task (`seqio_task`, data/seqio_source.py).
"""

import dataclasses
import enum

from stepaudio_jax.config.fields import coerce_enums, input_path

# Record tasks: what an example on disk is (data/records.py), not the training task (`task:`).
TASKS = ("text", "audio_continuation", "audio_text_interleaved", "asr", "tts", "image_text",
         "aqta")
AUDIO_TASKS = ("audio_continuation", "audio_text_interleaved", "asr", "tts", "aqta")
MODALITY_OF_TASK = {"text": "text", "image_text": "image", **{t: "audio" for t in AUDIO_TASKS}}


class DataSource(str, enum.Enum):
  SYNTHETIC = "synthetic"  # deterministic synthetic batches (data/synthetic.py)
  GRAIN = "grain"  # ArrayRecord shards through Grain (data/loader.py)


class Codebooks(str, enum.Enum):
  DUAL = "dual"  # 2 linguistic + 3 semantic codes per 120 ms (the report)
  SEMANTIC = "semantic"  # single-codebook ablations
  LINGUISTIC = "linguistic"


class SeqioIds(str, enum.Enum):
  RETOKENIZE = "retokenize"  # decode the Task's ids with its vocabulary, encode with ours
  TASK = "task"  # keep the Task's ids (right only if it uses our sentencepiece model)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Shares of segments by modality (the report's stage-1 mixture is audio:text:image 2:1:1)."""

  audio_weight: float = 2.0
  text_weight: float = 1.0
  image_weight: float = 1.0
  min_segment: int = 12
  max_segment: int = 48

  def __post_init__(self):
    if min(self.audio_weight, self.text_weight, self.image_weight) < 0:
      raise ValueError("synthetic modality weights must be >= 0")
    if self.audio_weight + self.text_weight + self.image_weight <= 0:
      raise ValueError("at least one synthetic modality weight must be positive")
    if not 4 <= self.min_segment <= self.max_segment:
      raise ValueError("need 4 <= min_segment <= max_segment")


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
  source: DataSource = DataSource.SYNTHETIC
  shards: dict[str, list[str]] = input_path(default_factory=dict)  # task -> globs
  # Held-out shards per task (e.g. the corpus' eval-* files) that train.eval_every reads; a
  # grain run with eval needs them for every task it mixes.
  eval_shards: dict[str, list[str]] = input_path(default_factory=dict)
  stages: list[StageConfig] = dataclasses.field(default_factory=lambda: [StageConfig()])
  codebooks: Codebooks = Codebooks.DUAL  # single-codebook ablations: semantic | linguistic
  skip_malformed: bool = False  # skip + count bad records instead of stopping the run
  pack_lookahead: int = 8  # segments that may wait for a later row (first-fit packing)
  # Largest |delivered - configured| token share of a task in a stage: a mixture predicted to
  # miss it stops before training, and a training stage past it is reported.
  share_tolerance: float = 0.02
  accept_share_shortfall: bool = False  # train anyway (with a warning) when a share is unreachable
  workers: int = 0  # grain mp_prefetch worker processes per JAX process (0 = in-process)
  # sentencepiece model; "" = byte-level fallback tokenizer
  tokenizer_model: str = input_path(default="")
  # The AudioTokenizer file that made the shards' codes (data_pipelines/tokenizer.py
  # load_tokenizer); what `stepaudio transcribe` and voice prompts code new audio with.
  audio_tokenizer: str = input_path(default="")
  asr_prompt: str = "Transcribe the speech."  # ASR system prompt
  # TTS system prompt; {speaker} comes from the example's metadata
  tts_prompt: str = "Speaker {speaker}; tags: emotion, language, dialect, style, speed."
  aqta_prompt: str = "You are a helpful voice assistant. Answer the user in text."
  # A registered seqio Task read as the text component instead of shards["text"] (needs the
  # `seqio` extra): its split's `seqio_feature`, ids re-encoded with our tokenizer or kept.
  seqio_task: str = ""
  seqio_module: str = ""  # module imported first, to register the Task (e.g. my_project.tasks)
  seqio_split: str = "train"
  seqio_eval_split: str = "validation"  # what train.eval_every reads from the Task
  seqio_feature: str = "targets"
  seqio_ids: SeqioIds = SeqioIds.RETOKENIZE

  def __post_init__(self):
    coerce_enums(self)
    if self.pack_lookahead < 1:
      raise ValueError("data.pack_lookahead must be >= 1")
    if not 0 < self.share_tolerance < 1:
      raise ValueError(f"data.share_tolerance must be in (0, 1), got {self.share_tolerance}")
    if self.workers < 0:
      raise ValueError("data.workers must be >= 0")
    if self.seqio_task and self.shards.get("text"):
      raise ValueError("data.seqio_task replaces data.shards.text; set only one of them")
    for key in ("shards", "eval_shards"):
      unknown = set(getattr(self, key)) - set(TASKS)
      if unknown:
        raise ValueError(f"data.{key} has unknown tasks {sorted(unknown)}; tasks are {TASKS}")
    if not self.stages:
      raise ValueError("data.stages needs at least one stage")
    if self.source == DataSource.GRAIN:
      for task in self.live_tasks():
        if not self.shards.get(task) and not (task == "text" and self.seqio_task):
          raise ValueError(f"data.stages give task {task!r} a share but data.shards has no "
                           f"{task} globs; add them or set its weight to 0")

  def live_tasks(self) -> list[str]:
    """Record tasks with a positive share in some stage, in TASKS order."""
    live = {t for stage in self.stages for t, w in stage.task_weights().items() if w > 0}
    return [t for t in TASKS if t in live]
