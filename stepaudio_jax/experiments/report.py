"""`stepaudio report RUN_DIR... --out DIR`: compare runs in a markdown table and PNG plots.

Each run is read from its directory: config.yaml (the resolved config the trainer wrote) and
metrics.jsonl (one line per logged train step and per eval, written by training/progress.py;
after a resume the newest line of a step wins). Runs are labelled by the config keys whose
values differ between them; runs that differ only in train.seed form a group, reported as mean
and sample standard deviation over its seeds.

Per run: the task's headline metrics at the last logged step, eval perplexity by token type
(exp of the mean next-token loss on held-out data, as in the report's Figure 4), the measured
token shares of each data task against the configured ones, and optionally the ASR CER of
greedy transcripts of held-out speech (experiments/asr.py).
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import yaml

from stepaudio_jax.training.progress import METRICS_FILE, SHARE, TARGET
from stepaudio_jax.training.trainer import DONE

TOKEN_TYPES = ("text", "audio_linguistic", "audio_semantic", "image_caption")
# Headline metrics of each task's last train line (others: the loss) ...
HEADLINE = {
    "reward": ("loss", "accuracy", "margin"),
    "ppo": ("rollout/score", "rollout/kl", "policy/loss", "critic/loss"),
    "vocoder": ("generator/mel_l1", "discriminator/loss"),
}
# ... and of its last eval (others: the loss and perplexity by token type).
EVAL_HEADLINE = {
    "reward": ("loss", "accuracy", "margin"),
    "ppo": ("rollout/score", "rollout/kl"),
    "vocoder": ("mel_l1",),  # the generator's losses on held-out speech
}
IGNORED_KEYS = ("train.run_dir",)  # differs between any two runs, says nothing about them
SEED_KEY = "train.seed"
MAX_LABEL_KEYS = 4  # runs differing in more keys are labelled by their directory's name


class ReportError(ValueError):
  pass


@dataclasses.dataclass
class Run:
  path: str
  config: dict  # flat: dotted key -> value
  train: list[dict]  # metrics.jsonl "train" lines, by step, the newest per step
  eval: list[dict]
  done: bool
  label: str = ""
  group: str = ""
  asr: dict | None = None  # cer, cer_by_language, clips, step, examples

  @property
  def task(self) -> str:
    return self.config.get("task", "pretrain")

  @property
  def has_metrics(self) -> bool:
    """Whether metrics.jsonl holds a train or eval line (a run that logged no step has none)."""
    return bool(self.train or self.eval)

  def summary(self) -> dict[str, float]:
    """The numbers of the run's table row."""
    out: dict[str, float] = {}
    if self.train:
      last = self.train[-1]
      out["step"] = last["step"]
      for k in HEADLINE.get(self.task, ("loss",)):
        if k in last:
          out[f"train/{k}"] = last[k]
    if self.eval:
      last = self.eval[-1]
      if self.task in EVAL_HEADLINE:
        out.update({f"eval/{k}": last[k] for k in EVAL_HEADLINE[self.task] if k in last})
      elif "loss" in last:
        out["eval/loss"] = last["loss"]
        for t in TOKEN_TYPES:
          if last.get(f"tokens/{t}", 0) > 0:
            out[f"eval/ppl/{t}"] = math.exp(last[f"loss/{t}"])
    if self.asr is not None:
      out["asr/cer"] = self.asr["cer"]
    return out

  def shares(self) -> dict[str, tuple[float, float]]:
    """Data task -> (measured share, configured share) at the last train line."""
    last = self.train[-1] if self.train else {}
    return {k[len(SHARE):]: (v, last.get(TARGET + k[len(SHARE):], float("nan")))
            for k, v in last.items() if k.startswith(SHARE) and k != SHARE + "drift"}


def _flatten(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def load_run(path: str) -> Run:
  config_file, metrics_file = (os.path.join(path, n) for n in ("config.yaml", METRICS_FILE))
  if not os.path.isfile(config_file):
    raise ReportError(f"{path} is not a run directory: it has no config.yaml (the trainer "
                      "writes it when a run starts)")
  with open(config_file) as f:
    config = _flatten(yaml.safe_load(f) or {})
  lines: dict[tuple[str, int], dict] = {}
  if os.path.isfile(metrics_file):
    with open(metrics_file) as f:
      text = f.read().splitlines()
    for n, line in enumerate(text, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        if n == len(text):  # a killed run's last line may be cut short
          continue
        raise ReportError(f"{metrics_file} line {n} is not JSON; the file is damaged") from None
      lines[(record["kind"], record["step"])] = record
  by_kind = {kind: [lines[k] for k in sorted(lines) if k[0] == kind]
             for kind in ("train", "eval")}
  return Run(path, config, by_kind["train"], by_kind["eval"],
             os.path.exists(os.path.join(path, DONE)))


def asr_scorable(run: Run) -> bool:
  """Whether experiments/asr.py can score `run`: an LM task (pretrain, sft) with held-out ASR
  shards to transcribe and a checkpoint to decode them with."""
  return (run.task in ("pretrain", "sft") and bool(run.config.get("data.eval_shards.asr"))
          and os.path.isdir(os.path.join(run.path, "checkpoints")))


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each key by its last part, or whole where two would read the same."""
  short = {k: k.rsplit(".", 1)[-1] for k in keys}
  clash = {s for s in short.values() if list(short.values()).count(s) > 1}
  return {k: (k if s in clash else s) for k, s in short.items()}


def _format_value(v) -> str:
  return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def label_runs(runs: list[Run]) -> list[str]:
  """Labels every run by the keys that differ between the runs (among keys all of them have);
  sets run.group (the label without the seed). Returns the differing keys."""
  # Keys that only some runs have come from different versions of the schema, not a choice.
  keys = sorted(set.intersection(*(set(r.config) for r in runs)) - set(IGNORED_KEYS))
  differing = [k for k in keys if len({_format_value(r.config.get(k)) for r in runs}) > 1]
  short = _short_keys(differing)
  for r in runs:
    parts = [f"{short[k]}={_format_value(r.config.get(k))}" for k in differing]
    if not parts or len(differing) > MAX_LABEL_KEYS:  # e.g. runs of different phases
      parts = [os.path.basename(os.path.normpath(r.path))]
    r.label = " ".join(parts)
    r.group = " ".join(p for k, p in zip(differing, parts) if k != SEED_KEY) or r.label
  return differing


def _fmt(x: float) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1:
    return f"{int(x)}"
  return f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(r) + " |" for r in rows)]


def by_group(runs: list[Run]) -> dict[str, list[Run]]:
  """Runs by run.group (label_runs sets it), groups in first-seen order."""
  groups: dict[str, list[Run]] = {}
  for r in runs:
    groups.setdefault(r.group, []).append(r)
  return groups


def group_stats(runs: list[Run]) -> dict[str, dict[str, tuple[float, float, int]]]:
  """Group -> metric -> (mean, sample std (nan for one run), runs)."""
  out = {}
  for g, members in by_group(runs).items():
    summaries = [r.summary() for r in members]
    keys = sorted({k for s in summaries for k in s if k != "step"})
    out[g] = {}
    for k in keys:
      values = np.array([s[k] for s in summaries if k in s], np.float64)
      std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
      out[g][k] = (float(values.mean()), std, len(values))
  return out


def write_report(runs: list[Run], out_dir: str, plot: bool = True) -> dict:
  """report.md, report.json and the PNG plots in out_dir; returns report.json's content."""
  os.makedirs(out_dir, exist_ok=True)
  differing = label_runs(runs)
  summaries = [r.summary() for r in runs]
  columns = sorted({k for s in summaries for k in s if k != "step"},
                   key=lambda k: (not k.startswith("train/"), k))
  md = ["# Run report", "",
        f"{len(runs)} runs; labelled by the config keys that differ: "
        f"{', '.join(differing) or '(none)'}. Perplexity is exp(mean held-out next-token loss) "
        "per token type at the last eval; `train/` values are the last logged step's.", "",
        "## Runs", ""]
  md += _table(["run", "task", "step", "finished", *columns],
               [[r.label, r.task, _fmt(s.get("step")), "yes" if r.done else "no",
                 *(_fmt(s.get(c)) for c in columns)] for r, s in zip(runs, summaries)])
  without = [r for r in runs if not r.has_metrics]
  if without:
    md += ["", f"No metrics in {', '.join(f'{r.label} ({r.path})' for r in without)}: "
               f"{METRICS_FILE} is missing or has no step (the run logged none); "
               "left out of the plots."]
  stats = group_stats(runs)
  if any(n > 1 for g in stats.values() for (_, _, n) in g.values()):
    md += ["", "## Groups (mean ± sample std over seeds)", ""]
    md += _table(["group", "seeds", *columns],
                 [[g, str(max((n for (_, _, n) in m.values()), default=0)),
                   *(f"{_fmt(m[c][0])} ± {_fmt(m[c][1])}" if c in m else "-" for c in columns)]
                  for g, m in stats.items()])
  shares = [(r, r.shares()) for r in runs if r.shares()]
  if shares:
    tasks = sorted({t for _, s in shares for t in s})
    md += ["", "## Token shares (measured / configured, last step)", ""]
    md += _table(["run", *tasks], [[r.label, *(f"{s[t][0]:.3f} / {s[t][1]:.3f}" if t in s
                                                 else "-" for t in tasks)] for r, s in shares])
  asr = [r for r in runs if r.asr]
  if asr:
    md += ["", "## ASR (greedy transcripts of held-out speech, CER by jiwer)", ""]
    langs = sorted({lang for r in asr for lang in r.asr["cer_by_language"]})
    md += _table(["run", "step", "clips", "CER", *langs],
                 [[r.label, str(r.asr["step"]), str(r.asr["clips"]), f"{r.asr['cer']:.3f}",
                   *(f"{r.asr['cer_by_language'].get(lang, float('nan')):.3f}" for lang in langs)]
                  for r in asr])
    ref, hyp = asr[0].asr["examples"][0] if asr[0].asr["examples"] else ("", "")
    md += ["", f"First clip of {asr[0].label}: reference `{ref}`, transcript `{hyp}`."]
  plots = []
  if plot:
    from stepaudio_jax.experiments import plots as plotting

    plots = plotting.write_plots(runs, out_dir)
    if plots:
      md += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  content = {
      "differing_keys": differing,
      "runs": [{"path": r.path, "label": r.label, "group": r.group, "task": r.task,
                "finished": r.done, "has_metrics": r.has_metrics, "summary": s,
                "shares": r.shares(), "asr": r.asr}
               for r, s in zip(runs, summaries)],
      "groups": {g: {k: {"mean": m, "std": sd, "n": n} for k, (m, sd, n) in v.items()}
                 for g, v in stats.items()},
      "plots": plots,
  }
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(content, f, indent=1, allow_nan=True)
  return content
