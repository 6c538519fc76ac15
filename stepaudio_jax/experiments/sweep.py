"""`stepaudio sweep SPEC`: variants of one base config, each trained in its own run directory.

A spec is YAML (loaded safely):

  base: codebooks.yaml                # the config every variant starts from, relative to the spec
  runs_dir: runs/ablations/codebooks  # variant NAME trains in RUNS_DIR/NAME (like train.run_dir)
  overrides: {train.steps: 300}       # for every variant
  product:                            # every combination; the first key varies slowest
    data.codebooks: [dual, semantic, linguistic]
    train.seed: [0, 1, 2]
  variants:                           # and/or an explicit list (a variant may name its own base)
    - {name: no-asr, overrides: {data.stages: [{tokens: 0, audio: 1, text: 1}]}}

A product variant is named by the last part of each key and its value (`codebooks-dual_seed-0`).
Variants run one after another as `stepaudio train BASE key=value ... train.run_dir=RUNS_DIR/NAME`
subprocesses, or through a launch script (`--launcher "sbatch launch/slurm_gpu.sbatch"`: the
script gets the same CONFIG and overrides). A variant whose run directory holds done.json (the
trainer writes it after the last step) is finished and skipped; any other resumes from its newest
checkpoint, so rerunning an interrupted sweep continues where it stopped.
"""

import dataclasses
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.loading import read_yaml
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import DONE

SPEC_KEYS = {"base", "runs_dir", "overrides", "product", "variants"}
VARIANT_KEYS = {"name", "base", "overrides"}


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  base: str  # config path as given to `stepaudio train`
  overrides: tuple[str, ...]  # key=value, ending with train.run_dir=...
  run_dir: str

  @property
  def done(self) -> bool:
    return os.path.exists(os.path.join(self.run_dir, DONE))


def _value(v) -> str:
  """A YAML value as the command line's `key=value` right-hand side reads it back."""
  if isinstance(v, str):
    return v
  return json.dumps(v)  # numbers, booleans, lists and mappings: JSON is YAML flow style


def _overrides(where: str, data) -> list[str]:
  if data is None:
    return []
  if not isinstance(data, dict):
    raise ConfigError(f"{where} must be a mapping of dotted keys to values, got {data!r}")
  if "train.run_dir" in data:
    raise ConfigError(f"{where} sets train.run_dir; the sweep sets it to RUNS_DIR/NAME")
  return [f"{k}={_value(v)}" for k, v in data.items()]


def _product_name(keys: Sequence[str], values: Sequence) -> str:
  short = [k.rsplit(".", 1)[-1] for k in keys]
  if len(set(short)) < len(short):
    short = [k.replace(".", "-") for k in keys]
  parts = []
  for k, v in zip(short, values):
    if isinstance(v, (list, dict)):
      raise ConfigError(f"product key {k!r} has a list or mapping value; give such variants "
                        "by name under `variants:`")
    parts.append(f"{k}-{_value(v)}")
  return "_".join(parts)


def load_spec(path: str) -> list[Variant]:
  """The spec's variants, in run order; every variant's config is loaded (and so checked)
  before anything runs, so a bad override in the last variant fails the sweep at once."""
  spec = read_yaml(path)
  unknown = set(spec) - SPEC_KEYS
  if unknown:
    raise ConfigError(f"sweep spec {path}: unknown keys {sorted(unknown)}; a spec has "
                      f"{sorted(SPEC_KEYS)}")
  here = os.path.dirname(os.path.abspath(path))

  def config_path(base, where):
    if not isinstance(base, str) or not base:
      raise ConfigError(f"{where}: `base` must name a config file")
    full = os.path.normpath(os.path.join(here, base))
    if not os.path.isfile(full):
      raise ConfigError(f"{where}: base config {base} ({full}) does not exist")
    return os.path.relpath(full)

  if not spec.get("runs_dir"):
    raise ConfigError(f"sweep spec {path} needs runs_dir (variant NAME trains in RUNS_DIR/NAME)")
  runs_dir, common = str(spec["runs_dir"]), _overrides(f"{path}: overrides",
                                                        spec.get("overrides"))
  entries = []  # (name, base, overrides)
  product = spec.get("product") or {}
  if not isinstance(product, dict) or any(not isinstance(v, list) or not v
                                          for v in product.values()):
    raise ConfigError(f"{path}: product maps each dotted key to a non-empty list of values")
  if product:
    base = config_path(spec.get("base"), path)
    keys = list(product)
    for values in itertools.product(*product.values()):
      entries.append((_product_name(keys, values), base,
                      common + _overrides(f"{path}: product", dict(zip(keys, values)))))
  for i, v in enumerate(spec.get("variants") or []):
    where = f"{path}: variants[{i}]"
    if not isinstance(v, dict) or set(v) - VARIANT_KEYS or not v.get("name"):
      raise ConfigError(f"{where} must be a mapping with a name and optional base, overrides "
                        f"({sorted(VARIANT_KEYS)}), got {v!r}")
    entries.append((str(v["name"]), config_path(v.get("base", spec.get("base")), where),
                    common + _overrides(where, v.get("overrides"))))
  if not entries:
    raise ConfigError(f"sweep spec {path} has no variants: give `product:` or `variants:`")
  names = [e[0] for e in entries]
  if len(set(names)) < len(names):
    raise ConfigError(f"sweep spec {path}: variant names repeat: {names}")
  out = []
  for name, base, overrides in entries:
    run_dir = os.path.join(runs_dir, name)
    overrides = (*overrides, f"train.run_dir={run_dir}")
    try:
      load_config(base, overrides)
    except ConfigError as e:
      raise ConfigError(f"sweep variant {name}: {e}") from None
    out.append(Variant(name, base, overrides, run_dir))
  return out


def command(variant: Variant, launcher: Sequence[str] = ()) -> list[str]:
  """How the variant runs: `stepaudio train` here, or the launch script with the same args."""
  prefix = list(launcher) or [sys.executable, "-m", "stepaudio_jax.cli", "train"]
  return [*prefix, variant.base, *variant.overrides]


def run_sweep(variants: Sequence[Variant], launcher: Sequence[str] = (), dry_run: bool = False,
              say: Callable[[str], None] = print) -> int:
  """Runs the unfinished variants in order; returns 0, or the first failing command's code
  (later variants are not started). SIGTERM to the sweep goes on to the running variant, which
  saves a checkpoint and exits; the sweep then stops, to be resumed by running it again."""
  todo = [v for v in variants if not v.done]
  say(f"sweep: {len(variants)} variants, {len(variants) - len(todo)} finished, "
      f"{len(todo)} to run" + (" (dry run: printing the commands)" if dry_run else ""))
  stopped = []
  for i, v in enumerate(variants, 1):
    cmd = command(v, launcher)
    if v.done:
      say(f"[{i}/{len(variants)}] {v.name}: finished ({v.run_dir}/{DONE}), skipped")
      continue
    resumes = os.path.isdir(os.path.join(v.run_dir, "checkpoints"))
    say(f"[{i}/{len(variants)}] {v.name}: {'resumes' if resumes else 'starts'} in {v.run_dir}")
    say("  " + shlex.join(cmd))
    if dry_run:
      continue
    code = _run_child(cmd, stopped)
    if stopped:
      say(f"sweep stopped by a signal during {v.name}; run it again to resume")
      return 128 + signal.SIGTERM
    if code:
      say(f"sweep: {v.name} failed with exit code {code}; later variants not started "
          "(rerun the sweep after fixing it: finished variants are skipped)")
      return code
  return 0


def _run_child(cmd: list[str], stopped: list) -> int:
  child = subprocess.Popen(cmd)

  def forward(signum, _frame):
    stopped.append(signum)
    child.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
