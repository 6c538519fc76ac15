"""Grain loader: shards -> per-task sources -> token-share mixture -> packed rows.

Every row of the global batch is its own deterministic stream (`RowStreams`): stream r draws
the k-th example of a task from index k * global_batch + r of that task's shuffled, endlessly
repeated records, picks tasks by the deficit rule of mixture.py and packs what fits into one row
per step. A process builds only its own rows (global rows [p * R, (p + 1) * R)), so the global
batch does not depend on the process count, and with data.workers = 0 the saved state (per row
stream) restores onto any process count. With workers > 0, Grain's mp_prefetch runs copies of
the pipeline in worker processes, each reading a 1/W slice of every task and building every
W-th batch; that state is per process and worker and restores only onto the same topology.
The eval loader (`held_out=True`) reads data.eval_shards in-process and starts over from its
first batch at every eval, mixing as the stage of the current step does.

Before training the loader checks that every stage can deliver its token shares
(mixture.check_shares); during training `stats()` gives each task's delivered share of the
current stage beside its target, and a drift past data.share_tolerance is logged.
`steps_for_epochs` says how many steps an epoch-based run (SFT) takes.
"""

import bisect
import copy
import glob
import json
import logging
import math
import os

import grain
import jax
import numpy as np

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.data import TASKS, DataConfig
from stepaudio_jax.config.model import TokenLayout, VisionConfig
from stepaudio_jax.data.mixture import (
  SegmentSize,
  StageSchedule,
  check_shares,
  new_stream,
  next_row,
  require_shares,
  rows_to_place,
)
from stepaudio_jax.data.packing import pack_row, truncate
from stepaudio_jax.data.records import (
  PREFERENCE,
  RecordError,
  ShardError,
  decode,
  decode_checked,
  task_of,
)
from stepaudio_jax.data.seqio_source import SeqioTextSource
from stepaudio_jax.data.source import BatchSource, LoaderStateError, process_rows
from stepaudio_jax.data.templates import Segment, TemplateContext, render, template_context

log = logging.getLogger(__name__)
SAMPLE_RECORDS = 256  # records per task whose lengths the start-up share check packs
DRIFT_WARMUP_ROWS = 4  # x data.pack_lookahead rows of a stage before its drift is reported


def resolve_shards(globs: list[str], key: str = "data.shards") -> list[str]:
  """The files the globs match, in order; `key` names the setting that gave them in errors."""
  paths = []
  for pattern in globs:
    found = sorted(glob.glob(pattern)) if "://" not in pattern else [pattern]
    if not found:
      raise ShardError(f"{key} pattern {pattern!r} matches no file; fix the pattern or "
                       "write the shards")
    paths += found
  return paths


def _open_shard(path: str) -> grain.sources.ArrayRecordDataSource:
  """One shard, opened now (its footer and index are read), so a broken file stops the loader
  before training, by name."""
  try:
    return grain.sources.ArrayRecordDataSource([path])
  except (RuntimeError, OSError) as e:
    size = os.path.getsize(path) if os.path.isfile(path) else None
    what = ("is empty (0 bytes)" if size == 0 else
            f"({size} bytes) is truncated or corrupt: {str(e) or 'no readable footer'}")
    raise ShardError(f"data shard {path} {what}; remove it from data.shards or rebuild it") from e


class RecordSource:
  """Random access over the records of several ArrayRecord shards, with where each came from."""

  def __init__(self, paths: list[str]):
    self.paths = paths
    self._shards = [_open_shard(p) for p in paths]
    self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
    if self._starts[-1] == 0:
      raise ShardError(f"shards {paths} hold no records; rebuild them or give the task no share")

  def __len__(self) -> int:
    return self._starts[-1]

  def check_task(self, task: str, key: str) -> None:
    """Refuse, naming the shard, both tasks and `key` (the setting that listed it), a shard
    whose first record is of another task than the one it was given for: TTS records under
    data.shards.aqta would otherwise train as TTS, and preference pairs stop at templating.
    A first record that cannot be decoded is left to the malformed-record path."""
    for shard, start in enumerate(self._starts[:-1]):
      if self._starts[shard + 1] == start:
        continue
      try:
        got = task_of(decode(self[start][1]))
      except RecordError:
        continue
      if got == task:
        continue
      path = self.paths[shard]
      if got == PREFERENCE:
        raise ShardError(
            f"{key}: shard {path} holds {PREFERENCE} records (a prompt with a chosen and a "
            f"rejected answer), not {task} records; preference pairs train task=reward "
            "(reward.stages) and give PPO its prompts (ppo.prompts): remove the shard here")
      raise ShardError(
          f"{key}: shard {path} holds {got} records, not {task} records; list it under the "
          f"{got} task (and give {got} a share) or remove it here")

  def __getitem__(self, index: int) -> tuple[str, bytes]:
    """(where, bytes); a record whose bytes fail the shard's checksums is a RecordError."""
    shard = bisect.bisect_right(self._starts, index) - 1
    local = index - self._starts[shard]
    where = f"shard {self.paths[shard]} record {local}"
    try:
      return where, self._shards[shard][local]
    except RuntimeError as e:  # riegeli: "Corrupted Riegeli/records file: ... hash mismatch"
      raise RecordError(f"{where}: fails its checksum ({e}); rebuild the shard") from e


class _Render:
  """Map step: read, decode, validate and template record `index` of `source` (None = malformed
  and skipped). Reading here, not in the source, puts a record that fails its checksum on the
  same skip-or-stop path as one that fails to decode; so is a record of another task than
  `task` (the shards' first records are checked at start: RecordSource.check_task)."""

  def __init__(self, source, ctx: TemplateContext, skip_malformed: bool, task: str):
    self.source, self.ctx, self.skip, self.task = source, ctx, skip_malformed, task

  def __call__(self, index: int) -> Segment | None:
    try:
      where, data = self.source[index]
      example = decode_checked(data, self.ctx.layout, where)
      if task_of(example) != self.task:
        raise RecordError(f"{where}: a {task_of(example)} record among the {self.task} records")
      return render(example, self.ctx)
    except RecordError as e:
      if self.skip:
        return None
      raise RecordError(f"{e} (data.skip_malformed=true skips and counts bad records)") from e


def _sample_lengths(source, order: grain.MapDataset, ctx: TemplateContext, task: str
                    ) -> list[int]:
  """Rendered lengths of the first SAMPLE_RECORDS records of a task's shuffled order (malformed
  ones left out): what the start-up share check packs."""
  render_one = _Render(source, ctx, skip_malformed=True, task=task)
  segs = (render_one(order[i]) for i in range(min(SAMPLE_RECORDS, len(source))))
  return [len(s) for s in segs if s is not None]


def _zeros() -> dict[str, int]:
  return {t: 0 for t in TASKS}


def _new_stream() -> dict:
  """A row stream's state: next_row's (stage, tokens drawn in it, draws per task), the draws
  still waiting for a row, tokens packed in the stage and in all, bad and cut records."""
  return {**new_stream(), "row": 0, "pending": [], "packed": _zeros(), "stage_packed": _zeros(),
          "malformed": 0, "truncated": 0}


class RowStreams(grain.IterDataset):
  """One packed row per stream per step for the global rows `rows` (see module docstring).

  `components[task]` repeats the task's `sizes[task]` records endlessly; index i reads record
  i mod size. A malformed record is counted once, at its first-pass draw (i < size), which
  exactly one stream of one process (and worker) makes: the count is per record, not per draw,
  without a set of seen records in the state, and it resumes onto any process count.
  """

  def __init__(self, components: dict[str, grain.MapDataset], sizes: dict[str, int],
               rows: range, global_batch: int, seq_len: int, schedule: StageSchedule,
               layout: TokenLayout, vision: VisionConfig, lookahead: int,
               fixed_step: int | None = None):
    super().__init__(list(components.values()))
    self.components, self.sizes = components, sizes
    self.rows, self.global_batch = rows, global_batch
    self.seq_len, self.schedule, self.layout, self.vision = seq_len, schedule, layout, vision
    self.lookahead, self.fixed_step = lookahead, fixed_step
    self.worker, self.workers = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Called by mp_prefetch in worker w of W with slice(w, None, W)."""
    self.worker, self.workers = sl.start or 0, sl.step or 1
    self.components = {t: c.slice(sl) for t, c in self.components.items()}

  def __iter__(self):
    return _RowStreamsIterator(self)


class _RowStreamsIterator(grain.DatasetIterator):
  def __init__(self, ds: RowStreams):
    super().__init__()
    self.ds = ds
    self.streams = {r: _new_stream() for r in ds.rows}
    # Waiting segments by stream and (task, draw); rebuilt from the state after a restore.
    self._waiting: dict[int, dict[tuple[str, int], Segment]] = {}

  def _index(self, r: int, draw: int) -> int:
    """Draw `draw` of stream r as an index into the task's endless record sequence (a worker's
    components are every workers-th item of it, from its own offset)."""
    return self.ds.worker + (draw * self.ds.global_batch + r) * self.ds.workers

  def _fetch(self, r: int, task: str, draw: int, first: bool = False) -> Segment | None:
    """Draw `draw` of `task` for stream r, cut to one row; `first` counts the cut."""
    seg = self.ds.components[task][draw * self.ds.global_batch + r]
    if seg is not None and len(seg) > self.ds.seq_len:
      self.streams[r]["truncated"] += first
      seg = truncate(seg, self.ds.seq_len)
    return seg

  def _row(self, r: int, st: dict) -> dict[str, np.ndarray]:
    """The stream's next row by mixture.next_row: a row holding vision.max_images_per_sequence
    images draws no more images (mixture.check_shares stops, before training, a mixture whose
    image share that cap cannot deliver). At a stage change the waiting segments (at most
    data.pack_lookahead per stream, all placed within that many rows) are delivered in the new
    stage and count toward its shares."""
    ds = self.ds
    step = ds.fixed_step if ds.fixed_step is not None else st["row"] * ds.workers + ds.worker
    stage = ds.schedule.stage_at(step)
    cache = self._waiting.setdefault(r, {})
    waiting = [((task, n), cache.get((task, n)) or self._fetch(r, task, n))
               for task, n in st["pending"]]
    if stage != st["stage"]:
      st["stage_packed"] = _zeros()

    def fetch(task: str, n: int) -> Segment | None:
      seg = self._fetch(r, task, n, first=True)
      if seg is None:
        st["malformed"] += self._index(r, n) < ds.sizes[task]
      return seg

    placed, left = next_row(st, stage, ds.schedule.weights[stage], waiting, fetch, ds.seq_len,
                            ds.vision.max_images_per_sequence, ds.lookahead)
    for key, seg in placed:
      st["packed"][key[0]] += len(seg)
      st["stage_packed"][key[0]] += len(seg)
      cache.pop(key, None)
    cache.update(left)
    st["pending"] = [list(key) for key, _ in left]
    st["row"] += 1
    return pack_row([seg for _, seg in placed], ds.seq_len, ds.layout, ds.vision)

  def __next__(self) -> dict:
    rows = [self._row(r, st) for r, st in self.streams.items()]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    stats = {f"tokens/{t}": sum(st["packed"][t] for st in self.streams.values()) for t in TASKS}
    stats["malformed"] = sum(st["malformed"] for st in self.streams.values())
    stats["truncated"] = sum(st["truncated"] for st in self.streams.values())
    stats["stage"] = max(st["stage"] for st in self.streams.values())
    stage_tokens = {t: sum(st["stage_packed"][t] for st in self.streams.values()) for t in TASKS}
    batch["stats"] = {"worker": self.ds.worker, "stage_tokens": stage_tokens, **stats}
    return batch

  def get_state(self) -> dict:
    return {"streams": {str(r): copy.deepcopy(st) for r, st in self.streams.items()}}

  def set_state(self, state: dict) -> None:
    # Keys a stream gained since the state was saved start as a new stream's (e.g. the
    # current stage's packed tokens, a counter for the share stats).
    self.streams = {r: {**_new_stream(), **copy.deepcopy(state["streams"][str(r)])}
                    for r in self.ds.rows}
    self._waiting = {}


def _allgather_json(obj) -> list:
  """Every process's JSON-able `obj`, in process order (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[: raw.size] = raw
  everything = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(everything[i, : sizes[i]].tobytes()) for i in range(len(sizes))]


class GrainLoader(BatchSource):
  """This process's rows of every global batch, plus a checkpointable iterator state."""

  def __init__(self, data: DataConfig, layout: TokenLayout, vision: VisionConfig, seq_len: int,
               global_batch: int, seed: int, fixed_step: int | None = None,
               held_out: bool = False):
    rows = process_rows(global_batch)
    schedule = StageSchedule(data.stages, global_batch * seq_len)
    imaged = [i for i, w in enumerate(schedule.weights) if w["image_text"] > 0]
    if imaged and not vision.enabled:  # here, not at load: compile and import read no data
      raise ConfigError(
          f"data.stages {imaged} give image_text a share but vision.enabled=false: set image: 0 "
          "in those stages (data.stages=[...] on the command line, or a config of your own) or "
          "keep vision.enabled=true")
    ctx = template_context(data, layout, vision)
    live = sorted({t for w in schedule.weights for t, v in w.items() if v > 0}, key=TASKS.index)
    shards = data.eval_shards if held_out else data.shards
    workers = 0 if held_out else data.workers
    # Tasks the start-up share check samples: those of the training stages that mix images.
    checked = set() if held_out else {t for w in schedule.weights if 0 < w["image_text"] < 1
                                      for t in TASKS if w[t]}
    components, sizes, lengths, sources, orders = {}, {}, {}, {}, {}
    for i, task in enumerate(live):
      if task == "text" and data.seqio_task:
        source = SeqioTextSource(data.seqio_task,
                                 data.seqio_eval_split if held_out else data.seqio_split,
                                 data.seqio_feature, data.seqio_ids, ctx.tokenizer,
                                 data.seqio_module)
      else:
        key = f"data.{'eval_shards' if held_out else 'shards'}"
        if not shards.get(task):
          raise ValueError(f"{key} has no globs for task {task!r}, which the stages mix")
        source = RecordSource(resolve_shards(shards[task], f"{key}.{task}"))
        source.check_task(task, f"{key}.{task}")
      order = grain.MapDataset.range(len(source)).shuffle(seed=seed * 1009 + i).repeat(None)
      components[task] = order.map(_Render(source, ctx, data.skip_malformed, task))
      sizes[task], sources[task], orders[task] = len(source), source, order
      if task in checked:
        lengths[task] = _sample_lengths(source, order, ctx, task)
    if not held_out:
      require_shares(check_shares(schedule, lengths, seq_len, vision.max_images_per_sequence,
                                  data.pack_lookahead, data.share_tolerance),
                     data.accept_share_shortfall, log.warning)
    self._ds = RowStreams(components, sizes, rows, global_batch, seq_len, schedule, layout,
                          vision, data.pack_lookahead, fixed_step)
    ds = self._ds
    if workers:
      from absl import flags  # grain's workers read absl flags, which must count as parsed

      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    self.data, self.seq_len, self.global_batch, self.workers = data, seq_len, global_batch, workers
    self._schedule, self._live, self._tolerance = schedule, live, data.share_tolerance
    self._sources, self._orders, self._ctx = sources, orders, ctx
    self._it = iter(ds)
    self._stats: dict[int, dict] = {}
    self._drift_reported: set[int] = set()

  def next_local(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    stats = batch.pop("stats")
    self._stats[stats.pop("worker")] = stats
    return batch

  def stats(self) -> dict[str, float]:
    """Cumulative counts of this process: packed tokens per task, malformed (skipped) records,
    each once however often it is drawn, truncated examples and the current stage; and, in the
    current stage, each mixed task's share of the packed tokens beside its target
    (`share/<task>`, `target/<task>`) and the largest difference (`share_drift`)."""
    if not self._stats:
      return {}
    stage = max(s["stage"] for s in self._stats.values())
    out: dict[str, float] = {"stage": stage}
    for s in self._stats.values():
      for k, v in s.items():
        if k not in ("stage", "stage_tokens"):
          out[k] = out.get(k, 0) + v
    delivered = {t: sum(s["stage_tokens"][t] for s in self._stats.values() if s["stage"] == stage)
                 for t in TASKS}
    total = sum(delivered.values())
    target = self._schedule.weights[stage]
    for t in self._live:
      out[f"share/{t}"] = delivered[t] / total if total else 0.0
      out[f"target/{t}"] = target[t]
    out["share_drift"] = max(abs(out[f"share/{t}"] - target[t]) for t in self._live)
    self._report_drift(stage, out, total)
    return out

  def _report_drift(self, stage: int, stats: dict, total: int) -> None:
    """Warn once per stage when a share is past data.share_tolerance after DRIFT_WARMUP_ROWS x
    data.pack_lookahead rows: by then the segments carried into the stage are placed and the
    deficit rule has made up for them."""
    rows = total / (self.seq_len * len(self._ds.rows))
    if (stats["share_drift"] <= self._tolerance or stage in self._drift_reported
        or rows < DRIFT_WARMUP_ROWS * self.data.pack_lookahead):
      return
    self._drift_reported.add(stage)
    off = ", ".join(f"{t} {stats[f'share/{t}']:.3f} (target {stats[f'target/{t}']:.3f})"
                    for t in self._live
                    if abs(stats[f"share/{t}"] - stats[f"target/{t}"]) > self._tolerance)
    log.warning("data: stage %d delivers %s of its %s packed tokens so far on this process, "
                "beyond data.share_tolerance=%s", stage + 1, off, f"{total:,}", self._tolerance)

  def steps_for_epochs(self, epochs: float) -> int:
    """Steps after which every record of the last stage's tasks has been packed into a row
    `epochs` times (a fraction: the first epochs x records of each task's shuffled order), draws
    in earlier stages included: the length of an epoch-based run such as SFT. Each record is
    rendered once for its length, then every global row stream (of every worker) is replayed on
    lengths alone by the loader's own rule, so the count is exact, deterministic and the same on
    every process."""
    if epochs <= 0:
      raise ValueError(f"epochs must be positive, got {epochs}")
    ds, rows, workers = self._ds, self.global_batch, max(self.workers, 1)
    lengths = {}
    for task, source in self._sources.items():
      if self._schedule.weights[-1][task] > 0:
        render_one = _Render(source, self._ctx, skip_malformed=True, task=task)
        lengths[task] = [None if s is None else min(len(s), self.seq_len)
                         for s in map(render_one, range(len(source)))]

    def steps(w: int, r: int) -> int:
      """Steps until stream r of worker w has placed its share of the epochs' draws: the
      endless-order indices w + (n * rows + r) * workers below epochs x records."""
      need = {t: max(0, math.ceil((math.ceil(epochs * len(sizes)) - w - r * workers)
                                  / (rows * workers))) for t, sizes in lengths.items()}

      def fetch(task: str, n: int) -> SegmentSize | None:
        size = lengths[task][self._orders[task][w + (n * rows + r) * workers]]
        return None if size is None else SegmentSize.of(task, size)

      placed = rows_to_place(self._schedule, fetch, need, lambda j: j * workers + w, self.seq_len,
                             ds.vision.max_images_per_sequence, ds.lookahead)
      return (placed - 1) * workers + w + 1 if placed else 0

    return max(steps(w, r) for w in range(workers) for r in range(rows))

  def _header(self) -> dict:
    return {"global_batch": self.global_batch, "seq_len": self.seq_len,
            "workers": self.workers, "process_count": jax.process_count()}

  def get_state(self) -> dict:
    """JSON-able state of every process's iterator (a collective when there are several)."""
    states = _allgather_json(self._it.get_state())
    if self.workers:
      return {**self._header(), "processes": states}
    return {**self._header(), "streams": {k: v for s in states for k, v in s["streams"].items()}}

  def set_state(self, state: dict) -> None:
    have = self._header()
    for key in ("global_batch", "seq_len", "workers"):
      if state[key] != have[key]:
        raise LoaderStateError(
            f"the data iterator was saved with {key}={state[key]}, this run has {have[key]}: "
            "the batches would differ. Resume with the same train.batch_size, train.seq_len and "
            "data.workers, or start a new train.run_dir.")
    if self.workers:
      if state["process_count"] != have["process_count"]:
        raise LoaderStateError(
            f"the data iterator was saved by {state['process_count']} processes with "
            f"data.workers={state['workers']} and this run has {have['process_count']} "
            "processes: with workers, each process's Grain worker pool holds its own share of "
            "the row streams, which cannot be re-split. Resume on "
            f"{state['process_count']} processes; to change the process count, train with "
            "data.workers=0 (per-row state restores onto any process count).")
      self._it.set_state(state["processes"][jax.process_index()])
    else:
      self._it.set_state({"streams": state["streams"]})
    self._stats = {}

  def restore(self, step: int, state: dict | None) -> None:
    if state is None:
      raise LoaderStateError(
          f"step {step} was saved without a Grain iterator state (data.source=synthetic); "
          "resume it with data.source=synthetic or start a new train.run_dir")
    self.set_state(state)

  def restart(self, at_step: int) -> None:
    if self.workers:
      raise LoaderStateError("only an in-process loader (workers=0) restarts")
    self._ds.fixed_step = at_step
    self._it = iter(self._ds)
    self._stats = {}
