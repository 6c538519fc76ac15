"""Does the trained speech decoder say the held-out codes? Numbers and plots for docs/speech_decoder.md.

For each held-out utterance (codes + its real wave): synthesise codes -> flow -> vocoder, then
  - re-tokenise the synthetic wave with the corpus tokenizer (16 kHz front end, its features
    and centroids) and, position by position, rank the input code among all centroids by
    distance to the synthetic feature: top-1 (the same code comes back), top-10, top-100 and
    the median rank (chance: a median near half the codebook, top-10 = 10 / codes);
  - the mean |log-mel| distance between the synthetic and the real wave;
and the same for a baseline: the utterance's own codes shuffled in time (whole 2:3 groups
permuted, so the code statistics are the same and only the order is lost), scored against the
unshuffled codes. Also the flow alone (its mel vs the real mel; its mel inverted by Griffin-Lim,
a vocoder with nothing learned, and re-tokenised) and the vocoder alone (the real mel vocoded,
re-tokenised). Writes summary.json, one WAV, mels.png and losses.png into --out.

With --listen (the `eval` extra), the same audio is also heard by evaluators nobody here wrote
(experiments/speech_eval.py: pocketsphinx WER on the English clips, STOI and resemblyzer speaker
cosine against the original): the original, the real mel through Griffin-Lim and through the
vocoder, the codes through the flow and Griffin-Lim or the vocoder, the shuffled codes, and with
--lm each English transcript synthesised from text by that TTS LM (`stepaudio synthesize`); the
table goes to listening.md and summary.json.

  python -m stepaudio_jax.experiments.speech_evidence --flow runs/speech/flow \
      --vocoder runs/speech/vocoder --pairs runs/speech_data/eval.safetensors \
      --out runs/speech/evidence --listen [--lm runs/speech/tts-lm]
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.io import wavfile

from data_pipelines import audio
from data_pipelines.kmeans_tokenizer import KMeansDualTokenizer
from stepaudio_jax.audio.mel import log_mel
from stepaudio_jax.data.speech_pairs import load_pairs
from stepaudio_jax.experiments.synthesize import TOKENIZER, load_decoder


def code_ranks(wave: np.ndarray, codes: np.ndarray, tok: KMeansDualTokenizer, sr: int
               ) -> dict[str, np.ndarray]:
  """Per codebook, the rank of each input code among all centroids ordered by distance to the
  re-tokenised wave's feature at that position (0 = the tokenizer would emit it again)."""
  w16 = audio.prepare(wave, sr)
  groups = codes.reshape(-1, 5)
  out = {}
  for name, book, want in (("linguistic", tok.ling, groups[:, :2].reshape(-1)),
                           ("semantic", tok.sem, groups[:, 2:].reshape(-1) - 1024)):
    z = ((book.raw(book.spec, w16) - book.mean) / book.scale) @ book.proj
    n = min(len(z), len(want))
    d = ((z[:n, None, :] - book.centroids[None]) ** 2).sum(-1)
    out[name] = (d < d[np.arange(n), want[:n]][:, None]).sum(1)
  return out


def rank_summary(ranks: list[np.ndarray]) -> dict[str, float]:
  """Top-1 (exact code), top-10, top-100 hit rates and the median rank, over all positions."""
  r = np.concatenate(ranks)
  return {"top1": float(np.mean(r == 0)), "top10": float(np.mean(r < 10)),
          "top100": float(np.mean(r < 100)), "median_rank": float(np.median(r))}


def mel_distance(a: np.ndarray, b: np.ndarray, cfg) -> float:
  ma, mb = (np.asarray(log_mel(jnp.asarray(w, jnp.float32)[None], cfg))[0] for w in (a, b))
  n = min(len(ma), len(mb))
  return float(np.mean(np.abs(ma[:n] - mb[:n])))


def griffin_lim(mel: np.ndarray, cfg) -> np.ndarray:
  """A vocoder with nothing learned (32 Griffin-Lim iterations, librosa), to score the flow
  model apart from the trained vocoder."""
  import librosa

  return librosa.feature.inverse.mel_to_audio(
      np.exp(mel).T, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop,
      win_length=cfg.win, power=1.0, n_iter=32, fmin=cfg.fmin, fmax=cfg.fmax)


def check_wave(wave: np.ndarray) -> dict:
  """What 'the WAV plays' means here: finite, in range, not silence."""
  rms = float(np.sqrt(np.mean(wave**2)))
  if not np.all(np.isfinite(wave)) or rms < 1e-3 or np.abs(wave).max() > 1.0:
    raise ValueError(f"synthetic wave is not playable speech: rms {rms}, "
                     f"finite {np.all(np.isfinite(wave))}, peak {np.abs(wave).max()}")
  return {"rms": rms, "peak": float(np.abs(wave).max())}


def plot(path: str, mels: dict[str, np.ndarray], title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, axes = plt.subplots(len(mels), 1, figsize=(8, 2.2 * len(mels)), squeeze=False)
  lo = min(m.min() for m in mels.values())
  for ax, (name, m) in zip(axes[:, 0], mels.items()):
    ax.imshow(m.T, origin="lower", aspect="auto", vmin=max(lo, -11.5), vmax=2.0, cmap="magma")
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("mel bin")
  axes[-1, 0].set_xlabel("frame (11.6 ms)")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_losses(path: str, flow_run: str, vocoder_run: str) -> None:
  """Training curves of both runs from their metrics.jsonl (train and eval rows)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  def rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
  for kind, style in (("train", "-"), ("eval", "o-")):
    r = [x for x in rows(flow_run) if x["kind"] == kind and "loss" in x]
    a.plot([x["step"] for x in r], [x["loss"] for x in r], style, label=f"flow {kind}")
  r = [x for x in rows(vocoder_run) if x["kind"] == "train"]
  for key in ("generator/mel_l1", "discriminator/loss"):
    b.plot([x["step"] for x in r], [x[key] for x in r], label=key)
  for ax, title in ((a, "flow: masked velocity MSE"), (b, "vocoder")):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def evaluate(flow_run: str, vocoder_run: str, pairs: str, out: str, count: int, seed: int,
             listen: bool = False, lm_run: str = "") -> dict:
  start = time.time()
  dec = load_decoder(flow_run, vocoder_run)
  mc = dec.flow_cfg.mel
  tok = KMeansDualTokenizer.load(TOKENIZER)
  utts = load_pairs(pairs, mc, dec.flow_cfg.speech_data.speaker_dim)[:count]
  rng = np.random.default_rng(seed)
  rows = []
  heard: dict[str, list[np.ndarray]] = {name: [] for name in LISTENING}
  os.makedirs(out, exist_ok=True)
  for i, u in enumerate(utts):
    key = jax.random.key(seed + i)
    shuffled = u.codes.reshape(-1, 5)[rng.permutation(len(u.codes) // 5)].reshape(-1)
    mel = dec.mel(u.codes, u.speaker, key)
    wave = dec.wave(mel)
    base_mel = dec.mel(shuffled, u.speaker, key)
    base = dec.wave(base_mel)
    real_mel = np.asarray(log_mel(jnp.asarray(u.wave)[None], mc))[0]
    copy = dec.wave(real_mel)
    waves = {"synth": wave, "shuffled": base, "vocoder_only": copy, "real": u.wave,
             "flow_griffin_lim": griffin_lim(mel, mc),
             "shuffled_griffin_lim": griffin_lim(base_mel, mc),
             "real_griffin_lim": griffin_lim(real_mel, mc)}
    for name, key in LISTENING.items():
      heard[name].append(waves[key])
    rows.append({
        "ranks": {k: code_ranks(w, u.codes, tok, mc.sample_rate) for k, w in waves.items()},
        "mel_synth": mel_distance(wave, u.wave, mc),
        "mel_shuffled": mel_distance(base, u.wave, mc),
        "mel_flow_only": float(np.mean(np.abs(mel - real_mel))),
        "mel_flow_only_shuffled": float(np.mean(np.abs(base_mel - real_mel))),
        "wave": check_wave(wave),
    })
    if i == 0:
      wavfile.write(os.path.join(out, "example.wav"), mc.sample_rate,
                    (np.clip(wave, -1, 1) * 32767).astype(np.int16))
      plot(os.path.join(out, "mels.png"),
           {"real speech": real_mel, "flow mel from the held-out codes": mel,
            "mel of the vocoded wave": np.asarray(log_mel(jnp.asarray(wave)[None], mc))[0],
            "shuffled-codes baseline (vocoded)":
                np.asarray(log_mel(jnp.asarray(base)[None], mc))[0]},
           f"held-out utterance ({u.name}, {len(u.codes) // 5 * 0.12:.2f} s)")
  mean = lambda k: float(np.mean([r[k] for r in rows]))
  summary = {
      "utterances": len(rows), "seconds": round(time.time() - start, 1),
      **{f"{book}_codes": {k: rank_summary([r["ranks"][k][book] for r in rows])
                           for k in rows[0]["ranks"]}
         for book in ("linguistic", "semantic")},
      "mel_l1": {"synth": mean("mel_synth"), "shuffled": mean("mel_shuffled"),
                 "flow_only": mean("mel_flow_only"),
                 "flow_only_shuffled": mean("mel_flow_only_shuffled")},
      "example_wav": {"sample_rate": mc.sample_rate, "samples": len(wave), **rows[0]["wave"]},
  }
  if listen:
    summary["listening"] = listening(utts, heard, mc.sample_rate, lm_run, flow_run, vocoder_run,
                                     out, seed)
  if all(os.path.isfile(os.path.join(r, "metrics.jsonl")) for r in (flow_run, vocoder_run)):
    plot_losses(os.path.join(out, "losses.png"), flow_run, vocoder_run)  # runs, not exports
  for r in rows:
    del r["ranks"]
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"summary": summary, "per_utterance": rows}, f, indent=1)
  return summary


# Listening table rows -> the evaluate() wave they hear.
LISTENING = {"original": "real", "original mel -> Griffin-Lim": "real_griffin_lim",
             "original mel -> vocoder": "vocoder_only",
             "true codes -> flow -> Griffin-Lim": "flow_griffin_lim",
             "true codes -> flow -> vocoder": "synth",
             "shuffled codes -> flow -> vocoder": "shuffled"}


def listening(utts, heard: dict[str, list[np.ndarray]], rate: int, lm_run: str, flow_run: str,
              vocoder_run: str, out: str, seed: int) -> dict:
  """The listening table (speech_eval.listen per row), written to out/listening.md."""
  from stepaudio_jax.experiments import speech_eval
  from stepaudio_jax.experiments.synthesize import read_wav, synthesize

  listener = speech_eval.Listener()
  clips = [speech_eval.Clip(u.text, u.wave, u.name.startswith("en")) for u in utts]
  table = {name: speech_eval.listen(listener, clips, waves, rate)
           for name, waves in heard.items()}
  if lm_run:
    english = [c for c in clips if c.english]
    spoken = []
    for i, c in enumerate(english):
      path = os.path.join(out, f"tts_{i}.wav")
      synthesize(lm_run, flow_run, vocoder_run, f"(English) {c.text}", path, seed=seed + i,
                 say=lambda *a, **k: None)
      spoken.append(read_wav(path, rate))
    table["text -> TTS LM -> flow -> vocoder"] = speech_eval.listen(listener, english, spoken,
                                                                    rate)
  with open(os.path.join(out, "listening.md"), "w") as f:
    f.write(speech_eval.table(table) + "\n")
  return table


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--flow", required=True)
  p.add_argument("--vocoder", required=True)
  p.add_argument("--pairs", required=True, help="an eval.safetensors of build_speech_pairs")
  p.add_argument("--out", required=True)
  p.add_argument("--count", type=int, default=12)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--listen", action="store_true",
                 help="also WER, STOI and speaker cosine by outside evaluators (eval extra)")
  p.add_argument("--lm", default="", help="with --listen: a TTS LM run to synthesise from text")
  args = p.parse_args(argv)
  summary = evaluate(args.flow, args.vocoder, args.pairs, args.out, args.count, args.seed,
                     args.listen, args.lm)
  print(json.dumps(summary, indent=1))
  if args.listen:
    from stepaudio_jax.experiments.speech_eval import table

    print(table(summary["listening"]))


if __name__ == "__main__":
  main()
