"""Build the committed corpus: `python -m data_pipelines.build_corpus --out data_pipelines/corpus`.

Everything is derived from the grammar and a seed: sentences and answers (grammar.py), speech
from espeak-ng (speak.py), the dual k-means audio tokenizer fitted on the corpus's own training
audio, a sentencepiece model fitted on its text, captioned shape images, then one directory of
ArrayRecord shards per task with a train and an eval split. manifest.json records counts, tags,
sizes and the tokenizer settings so tests and loaders can check what they read.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import random
import shutil
import subprocess
import time

import numpy as np

from data_pipelines import audio, grammar, images, speak, text_tokenizer
from data_pipelines.kmeans_tokenizer import LINGUISTIC, SEMANTIC, KMeansDualTokenizer
from stepaudio_jax.data import records

# Utterances per language for each audio task (train + eval; eval is EVAL_FRACTION of them).
PLAN = {
    "asr": {"english": 240, "mandarin": 160, "cantonese": 120},
    "tts": {"english": 200, "mandarin": 150, "cantonese": 150},
    "aqta": {"english": 240, "mandarin": 160, "cantonese": 120},
    "audio_continuation": {"english": 60, "mandarin": 50, "cantonese": 50},
    "audio_text_interleaved": {"english": 60, "mandarin": 50, "cantonese": 50},
}
TEXT_EXAMPLES = 1500
IMAGE_EXAMPLES = 300
IMAGE_SIZE = 64
EVAL_FRACTION = 0.1
TEXT_VOCAB = 1024  # sentencepiece pieces; every id is below this
AUDIO_TOKENIZER_FILE = "audio_tokenizer.safetensors"
SPM_FILE = "spm_unigram.model"


@dataclasses.dataclass
class Job:
  """One planned example: its chunks' sentences and how they are spoken."""

  task: str
  split: str
  language: str
  chunks: list[list[grammar.Sentence]]  # one espeak-ng call per chunk
  voice: speak.Voice
  speed: str
  waves: list[np.ndarray] = dataclasses.field(default_factory=list)  # 16 kHz, filled later


def sentence_pools(world: grammar.World, language: str, split: str
                   ) -> tuple[list[grammar.Sentence], list[grammar.Sentence]]:
  """(statements, questions) a split may use: held-out arithmetic for eval only."""
  pools = []
  for question in (False, True):
    pools.append([s for s in grammar.all_sentences(world, language, question)
                  if s.topic != "arithmetic" or grammar.held_out(s) == (split == "eval")])
  return pools[0], pools[1]


def plan_jobs(world: grammar.World, rng: random.Random) -> list[Job]:
  """Decide every audio example: sentences, speaker and speed.

  Per task and language, every tenth example is an eval one spoken by a training voice, and as
  many again are eval examples spoken by the language's unseen voice; training examples cycle
  through the training voices. Eval examples draw arithmetic only from the held-out facts,
  training examples never do.
  """
  jobs = []
  for task, per_lang in PLAN.items():
    for lang, n in per_lang.items():
      voices, speeds = speak.VOICES[lang], list(speak.SPEEDS)
      every = round(1 / EVAL_FRACTION)
      pools = {split: sentence_pools(world, lang, split) for split in ("train", "eval")}
      for i in range(n + n // every):
        split = "eval" if i >= n or i % every == 0 else "train"
        statements, questions = pools[split]
        world_qs = [q for q in questions if q.topic != "arithmetic"]
        if task == "aqta":  # world questions are few: ask them often so they are learnt
          chunks = [[rng.choice(world_qs if rng.random() < 0.4 else questions)]]
        elif task == "asr":
          chunks = [[rng.choice(questions if rng.random() < 0.4 else statements)]]
        elif task == "tts":
          chunks = [[rng.choice(statements)]]
        elif task == "audio_continuation":
          chunks = [grammar.paragraph(rng, statements, rng.randint(3, 5))]
        else:
          chunks = [[s] for s in grammar.paragraph(rng, statements, rng.randint(3, 4))]
        # TTS cycles speeds evenly so every speed tag has audio; other tasks are mostly normal.
        speed = speeds[i % len(speeds)] if task == "tts" else (
            rng.choice(speeds) if rng.random() < 0.3 else "normal")
        voice = (speak.UNSEEN_VOICES[lang] if i >= n else
                 voices[(i // every) % len(voices)] if split == "eval" else voices[i % len(voices)])
        jobs.append(Job(task, split, lang, chunks, voice, speed))
  return jobs


def synthesise(jobs: list[Job], workers: int) -> None:
  """Fill every job's waves (espeak-ng runs as subprocesses, so threads parallelise it)."""
  def one(job: Job) -> list[np.ndarray]:
    return [audio.prepare(*speak.speak(grammar.join(c, spoken=True), job.voice,
                                        speak.SPEEDS[job.speed])) for c in job.chunks]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for job, waves in zip(jobs, pool.map(one, jobs)):
      job.waves = waves


def text_split(i: int) -> str:
  """Every tenth text document (and caption) is an eval one."""
  return "eval" if i % round(1 / EVAL_FRACTION) == 0 else "train"


def text_lines(world: grammar.World, rng: random.Random) -> list[str]:
  """Text-only documents: paragraphs of statements and question-answer lines."""
  lines = []
  pools = {(lang, split): sentence_pools(world, lang, split)
           for lang in grammar.LANGUAGES for split in ("train", "eval")}
  for i in range(TEXT_EXAMPLES):
    lang = grammar.LANGUAGES[i % 3]
    statements, questions = pools[lang, text_split(i)]
    if i % 2:
      lines.append(grammar.join(grammar.paragraph(rng, statements, rng.randint(2, 6))))
    else:
      q = rng.choice(questions)
      lines.append(f"{q.text} {q.answer}")
  return lines


def audio_examples(job: Job, tok: KMeansDualTokenizer, spm: text_tokenizer.TextTokenizer
                   ) -> list[tuple[str, records.Example]]:
  """The (task directory, record) pairs a synthesised job gives: the record its task expects,
  and for a training job an ASR record of each chunk that is one sentence (TTS utterances, AQTA
  questions, interleaved chunks), so every transcribed utterance also teaches listening."""
  empty = np.zeros(0, np.int32)
  ling = [tok.linguistic(w) for w in job.waves]
  sem = [tok.semantic(w) for w in job.waves]
  texts = [grammar.join(c) for c in job.chunks]
  voice = "unseen" if job.voice in speak.UNSEEN_VOICES.values() else "seen"

  def metadata(chunks: list[list[grammar.Sentence]], waves: list[np.ndarray]) -> dict:
    return {"language": job.language, "speaker": job.voice.name, "voice": voice,
            "speed": job.speed, "speed_wpm": speak.SPEEDS[job.speed], "split": job.split,
            "source": "espeak-ng",
            "duration_s": round(sum(len(w) for w in waves) / audio.SAMPLE_RATE, 3),
            "transcript": grammar.join([s for c in chunks for s in c]),
            "spoken": " ".join(grammar.join(c, spoken=True) for c in chunks)}

  meta = metadata(job.chunks, job.waves)
  if job.task == "aqta":
    q = job.chunks[0][0]
    meta.update(kind="aqta", chunk_roles="question,answer", question=q.text, answer=q.answer,
                topic=q.topic, **{k: v for k, v in q.facts})
    # Chunk 0: the spoken question (no text); chunk 1: the text answer (no audio).
    main = records.Example("audio_text_interleaved", [empty, spm.encode(q.answer)],
                           [ling[0], empty], [sem[0], empty], None, meta)
  elif job.task == "audio_continuation":
    main = records.Example(job.task, [empty], ling, sem, None, meta)
  else:
    if job.task == "tts":
      tags = [speak.LANGUAGE_TAGS[job.language]] + ([job.speed] if job.speed != "normal" else [])
      meta.update(dialect=job.language, instruction="".join(f"({t})" for t in tags))
    main = records.Example(job.task, [spm.encode(t) for t in texts], ling, sem, None, meta)
  out = [(job.task, main)]
  if job.split == "train" and job.task in ("tts", "aqta", "audio_text_interleaved"):
    for chunk, wave, l, s in zip(job.chunks, job.waves, ling, sem):
      if len(chunk) == 1:
        m = {**metadata([chunk], [wave]), "from_task": job.task}
        out.append(("asr", records.Example("asr", [spm.encode(chunk[0].text)], [l], [s],
                                           None, m)))
  return out


def write_task(out: str, task_dir: str, examples: list[records.Example], shards: int
               ) -> dict[str, int]:
  """Write `{task_dir}/{split}-SSSSS-of-NNNNN.array_record`; returns examples per file."""
  os.makedirs(os.path.join(out, task_dir), exist_ok=True)
  counts = {}
  for split in ("train", "eval"):
    part = [e for e in examples if e.metadata.get("split", "train") == split]
    n = shards if split == "train" else 1
    for s in range(n):
      name = f"{task_dir}/{split}-{s:05d}-of-{n:05d}.array_record"
      counts[name] = records.write_shard(os.path.join(out, name), part[s::n])
  return counts


def build(out: str, seed: int, linguistic_codes: int, semantic_codes: int, workers: int) -> dict:
  """Regenerate the whole corpus under `out`; returns the manifest."""
  t0 = time.time()
  if os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(out)
  rng, world = random.Random(seed), grammar.World.make(seed)
  jobs = plan_jobs(world, rng)
  docs = text_lines(world, rng)
  image_items = [images.sample(rng) for _ in range(IMAGE_EXAMPLES)]
  captions = [images.caption(it, "english" if i % 2 == 0 else "mandarin")
              for i, it in enumerate(image_items)]
  # Trained on the training splits only, so an eval sentence's pieces are not fitted to it.
  spm_lines = ([d for i, d in enumerate(docs) if text_split(i) == "train"]
               + [c for i, c in enumerate(captions) if text_split(i) == "train"]
               + [grammar.join(c) for j in jobs if j.split == "train" for c in j.chunks])
  text_tokenizer.train(spm_lines, os.path.join(out, SPM_FILE), TEXT_VOCAB)
  spm = text_tokenizer.TextTokenizer(os.path.join(out, SPM_FILE))
  t_text = time.time()

  synthesise(jobs, workers)
  t_speech = time.time()
  train_waves = [w for j in jobs if j.split == "train" for w in j.waves]
  tok = KMeansDualTokenizer.fit(
      train_waves, dataclasses.replace(LINGUISTIC, codes=linguistic_codes),
      dataclasses.replace(SEMANTIC, codes=semantic_codes), seed=seed)
  tok.save(os.path.join(out, AUDIO_TOKENIZER_FILE))
  t_fit = time.time()

  by_task: dict[str, list[records.Example]] = collections.defaultdict(list)
  for job in jobs:
    for task_dir, example in audio_examples(job, tok, spm):
      by_task[task_dir].append(example)
  empty = np.zeros(0, np.int32)
  for i, line in enumerate(docs):
    by_task["text"].append(records.Example("text", [spm.encode(line)], [empty], [empty], None, {
        "language": grammar.LANGUAGES[i % 3], "split": text_split(i)}))
  for i, (items, cap) in enumerate(zip(image_items, captions)):
    by_task["image_text"].append(records.Example(
        "image_text", [spm.encode(cap)], [empty], [empty], images.draw(items, IMAGE_SIZE),
        {"caption": cap, "language": "english" if i % 2 == 0 else "mandarin",
         "split": text_split(i)}))
  files = {}
  for task, exs in sorted(by_task.items()):
    files.update(write_task(out, task, exs, shards=2))
  t_write = time.time()

  stats: dict[str, dict] = {}
  for task, exs in sorted(by_task.items()):
    s = stats[task] = {"examples": len(exs), "record_task": exs[0].task}
    for key in ("split", "language", "voice", "speed", "instruction", "speaker", "topic",
                "from_task"):
      c = collections.Counter(str(e.metadata[key]) for e in exs if key in e.metadata)
      if c:
        s[key] = dict(sorted(c.items()))
    if task not in ("text", "image_text"):
      s["audio_seconds"] = round(sum(float(e.metadata["duration_s"]) for e in exs), 1)
  version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
  manifest = {
      "seed": seed, "espeak_ng": version.strip(), "sample_rate": audio.SAMPLE_RATE,
      "audio_tokenizer": {"file": AUDIO_TOKENIZER_FILE, "kind": "kmeans log-mel",
                          "linguistic": dataclasses.asdict(tok.ling.spec),
                          "semantic": dataclasses.asdict(tok.sem.spec)},
      "text_tokenizer": {"file": SPM_FILE, "pieces": spm.vocab_size, "ids_below": TEXT_VOCAB,
                         "pad": 0, "bos": 1, "unk": 2, "eos": 3, "bot": 4},
      "image_size": IMAGE_SIZE, "tasks": stats, "files": files,
      "bytes": {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))
                if os.path.isfile(os.path.join(out, f))},
      "seconds": {"text": round(t_text - t0, 1), "speech": round(t_speech - t_text, 1),
                  "tokenizer_fit": round(t_fit - t_speech, 1), "write": round(t_write - t_fit, 1)},
  }
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, ensure_ascii=False)
  return manifest


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="data_pipelines/corpus")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--linguistic-codes", type=int, default=LINGUISTIC.codes)
  p.add_argument("--semantic-codes", type=int, default=SEMANTIC.codes)
  p.add_argument("--workers", type=int, default=2)
  a = p.parse_args(argv)
  if not speak.available():
    raise SystemExit("espeak-ng not found: apt-get install -y espeak-ng (the committed corpus "
                     "under data_pipelines/corpus does not need it)")
  m = build(a.out, a.seed, a.linguistic_codes, a.semantic_codes, a.workers)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.out) for f in fs)
  print(json.dumps({"tasks": {t: s["examples"] for t, s in m["tasks"].items()},
                    "seconds": m["seconds"], "total_bytes": total}, indent=1))


if __name__ == "__main__":
  main()
