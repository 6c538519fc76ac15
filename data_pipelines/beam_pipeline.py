"""Apache Beam pipeline: audio files -> 16 kHz mono peak-normalised -> dual codes -> shards.

Tokenising millions of hours is embarrassingly parallel and must not run on training hosts (the
report moves preprocessing off them), so this is a Beam job: DirectRunner on one machine, the
same code on Dataflow, Flink or Spark at scale (see README.md for flags). Elements cross stages
as `records.encode` bytes, so nothing is pickled in transit; the tokenizer is built once per
worker from a spec string (`tokenizer.load_tokenizer`).

Input is a JSONL manifest, one object per audio file:
  {"audio": "path.wav", "task": "asr", "text": "transcript", "metadata": {...}}
or a glob of WAV files (task "audio_continuation", no text). Output:
  {output_prefix}-SSSSS-of-NNNNN.array_record, records sorted by audio path within a shard.
"""

import argparse
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipelines import audio
from data_pipelines.tokenizer import load_tokenizer
from stepaudio_jax.data import records

AUDIO_TASKS = ("audio_continuation", "asr", "tts")  # one audio chunk with optional text


def read_manifest(manifest: str | None, input_glob: str | None) -> list[dict]:
  """Entries from a JSONL manifest, or one continuation entry per file matching input_glob."""
  if manifest:
    with FileSystems.open(manifest) as f:
      entries = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
  else:
    matched = FileSystems.match([input_glob])[0].metadata_list
    entries = [{"audio": m.path} for m in sorted(matched, key=lambda m: m.path)]
  for e in entries:
    e.setdefault("task", "audio_continuation")
    if e["task"] not in AUDIO_TASKS:
      raise ValueError(f"{e['audio']}: task {e['task']!r} is not one of {AUDIO_TASKS}")
  return entries


class TokenizeFn(beam.DoFn):
  """Manifest entry -> (shard, (path, encoded Example)); loads tokenizers once per worker."""

  def __init__(self, tokenizer_spec: str, spm_model: str | None, num_shards: int):
    self.tokenizer_spec, self.spm_model, self.num_shards = tokenizer_spec, spm_model, num_shards

  def setup(self) -> None:
    self.tok = load_tokenizer(self.tokenizer_spec)
    self.spm = None
    if self.spm_model:
      from data_pipelines.text_tokenizer import TextTokenizer
      self.spm = TextTokenizer(self.spm_model)

  def process(self, entry: dict) -> Iterator[tuple[int, tuple[str, bytes]]]:
    from scipy.io import wavfile
    with FileSystems.open(entry["audio"]) as f:
      sr, pcm = wavfile.read(f)
    wave = audio.prepare(pcm, int(sr))
    text = entry.get("text", "")
    ids = self.spm.encode(text) if (self.spm and text) else np.zeros(0, np.int32)
    meta = {"source": entry["audio"], "duration_s": round(len(wave) / audio.SAMPLE_RATE, 3),
            **({"transcript": text} if text else {}), **entry.get("metadata", {})}
    ex = records.Example(entry["task"], [ids], [self.tok.linguistic(wave)],
                         [self.tok.semantic(wave)], None, meta)
    shard = zlib.crc32(entry["audio"].encode()) % self.num_shards
    yield shard, (entry["audio"], records.encode(records.validate(ex)))


def write_shard(item: tuple[int, Iterable[tuple[str, bytes]]], prefix: str, num_shards: int
                ) -> str:
  """Write one shard's records in a deterministic order; returns its path.

  ArrayRecord writes local files only, so the shard is built in a temporary file and streamed
  to its destination through Beam's FileSystems (local disk, gs://, s3://, hdfs://).
  """
  shard, keyed = item
  path = f"{prefix}-{shard:05d}-of-{num_shards:05d}.array_record"
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "shard.array_record")
    records.write_shard(local, (records.decode(b) for _, b in sorted(keyed)))
    with open(local, "rb") as src, FileSystems.create(path) as dst:
      shutil.copyfileobj(src, dst)
  return path


def build(p: beam.Pipeline, entries: list[dict], tokenizer_spec: str, spm_model: str | None,
          output_prefix: str, num_shards: int) -> beam.PCollection:
  """Add the pipeline's transforms to `p`; the result holds the written shard paths."""
  return (p
          | "Entries" >> beam.Create(entries)
          | "Spread" >> beam.Reshuffle()
          | "Tokenize" >> beam.ParDo(TokenizeFn(tokenizer_spec, spm_model, num_shards))
          | "ByShard" >> beam.GroupByKey()
          | "Write" >> beam.Map(write_shard, output_prefix, num_shards))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--manifest", help="JSONL: audio, task, text, metadata per line")
  src.add_argument("--input_glob", help="WAV files for audio_continuation")
  p.add_argument("--tokenizer", required=True,
                 help="kmeans:PATH.safetensors or module:factory returning an AudioTokenizer")
  p.add_argument("--spm_model", help="sentencepiece model for transcripts")
  p.add_argument("--output_prefix", required=True)
  p.add_argument("--num_shards", type=int, default=4)
  return p.parse_known_args(argv)


def run(argv: list[str] | None = None) -> list[str]:
  """Run with Beam flags passed through (--runner, --project, ...); returns the shard paths.

  Shards with no records are not written, so fewer than num_shards files may appear.
  """
  args, beam_args = parse_args(argv)
  entries = read_manifest(args.manifest, args.input_glob)
  with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
    build(p, entries, args.tokenizer, args.spm_model, args.output_prefix, args.num_shards)
  found = FileSystems.match([f"{args.output_prefix}-*-of-{args.num_shards:05d}.array_record"])
  return sorted(m.path for m in found[0].metadata_list)


if __name__ == "__main__":
  print("\n".join(run()))
