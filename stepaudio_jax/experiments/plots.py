"""The report's PNG plots (matplotlib, no display): one figure per question a reader asks."""

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stepaudio_jax.experiments.report import TOKEN_TYPES, Run, by_group  # noqa: E402


def _curve(ax, runs: list[Run], kind: str, key, label: str, transform=lambda x: x,
           color: str | None = None) -> bool:
  """Mean over the group's runs at the steps they all logged, with a ±std band."""
  series = []
  for r in runs:
    points = {rec["step"]: transform(value) for rec in getattr(r, kind)
              if (value := key(rec)) is not None}
    series.append(points)
  steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
  if not steps:
    return False
  values = np.array([[s[t] for t in steps] for s in series])
  mean = values.mean(0)
  line, = ax.plot(steps, mean, label=f"{label} (n={len(runs)})", color=color)
  if len(runs) > 1:
    std = values.std(0, ddof=1)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  return True


def _save(fig, out_dir: str, name: str, plots: list[str], drawn: bool = True) -> None:
  """Write `fig` as `name` if anything was `drawn` in it (no empty plots); close it."""
  if drawn:
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plots.append(name)
  plt.close(fig)


def _legend(ax, drawn: bool) -> None:
  if drawn:  # an empty legend is a matplotlib warning
    ax.legend(fontsize=7)


def write_plots(runs: list[Run], out_dir: str) -> list[str]:
  """Writes the plots the runs have data for; returns their file names. Runs without metrics
  are left out."""
  plots: list[str] = []
  runs = [r for r in runs if r.has_metrics]
  groups = by_group(runs)
  color = {g: f"C{i % 10}" for i, g in enumerate(groups)}  # one colour per group in every plot
  types = [t for t in TOKEN_TYPES
           if any(rec.get(f"tokens/{t}", 0) > 0 for r in runs for rec in r.eval)]
  if types:
    fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.6), squeeze=False,
                             layout="constrained")
    for ax, t in zip(axes[0], types):
      drawn = [_curve(ax, members, "eval",
                      lambda rec, t=t: (rec.get(f"loss/{t}") if rec.get(f"tokens/{t}", 0) > 0
                                        else None), g, math.exp, color[g])
               for g, members in groups.items()]
      ax.set(title=f"held-out perplexity: {t}", xlabel="step", yscale="log")
      _legend(ax, any(drawn))
    _save(fig, out_dir, "perplexity.png", plots)
  if any(r.train for r in runs):
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    drawn = [_curve(ax, members, "train", lambda rec: rec.get("loss"), g, color=color[g])
             for g, members in groups.items()]
    ax.set(title="training loss", xlabel="step")
    _legend(ax, any(drawn))
    _save(fig, out_dir, "train_loss.png", plots, any(drawn))
  with_shares = [(g, members[0].shares()) for g, members in groups.items()
                 if members[0].shares()]
  if with_shares:
    tasks = sorted({t for _, s in with_shares for t in s})
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 3.6), layout="constrained")
    width = 0.8 / (len(with_shares) + 1)
    x = np.arange(len(tasks))
    ax.bar(x, [with_shares[0][1].get(t, (0, 0))[1] for t in tasks], width, label="configured",
           color="lightgray", edgecolor="black")
    for i, (g, s) in enumerate(with_shares, 1):
      ax.bar(x + i * width, [s.get(t, (0, 0))[0] for t in tasks], width, label=g, color=color[g])
    ax.set_xticks(x + width * len(with_shares) / 2, tasks, rotation=20, fontsize=8)
    ax.set(title="token share by data task (measured at the last step)", ylabel="share")
    ax.legend(fontsize=7)
    _save(fig, out_dir, "shares.png", plots)
  for task, keys, name in (("reward", ("accuracy", "margin"), "reward.png"),
                           ("ppo", ("rollout/score", "rollout/kl"), "ppo.png")):
    members = [r for r in runs if r.task == task]
    if not members:
      continue
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False,
                             layout="constrained")
    anything = False
    for ax, k in zip(axes[0], keys):
      drawn = [_curve(ax, [r], kind, lambda rec, k=k: rec.get(k), f"{r.label} {kind}")
               for r in members for kind in ("train", "eval")]
      ax.set(title=k, xlabel="step")
      _legend(ax, any(drawn))
      anything |= any(drawn)
    _save(fig, out_dir, name, plots, anything)
  return plots
