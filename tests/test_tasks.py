"""The generic step, state, setup and loop with a task defined here and nowhere else.

`ToyGan` has three models (a generator and a discriminator that train, a frozen reference), two
alternating updates per step (discriminator, then generator), a stochastic loss, its own
batch field and its own config section (`toy_gan:`, registered from this file): what a GAN
vocoder, flow matching or PPO needs from the core, at toy size. It is checked against the same
step written out by hand in plain JAX + optax, then loaded from YAML, trained, evaluated,
checkpointed and resumed by the real trainer, with hooks of the caller's own.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.fields import input_path
from stepaudio_jax.config.training import OptimizerConfig
from stepaudio_jax.data.source import BatchSource, process_rows
from stepaudio_jax.tasks.base import (EVAL_METRICS, BatchField, Model, Split, Task, Update,
                                      map_first_pass)
from stepaudio_jax.tasks.registry import load_config, register_task, task_class, task_names
from stepaudio_jax.training import state as state_lib
from stepaudio_jax.training.hooks import check_finite
from stepaudio_jax.training.loop import Every
from stepaudio_jax.training.progress import METRICS_FILE
from stepaudio_jax.training.optimizer import Optimizer, make_optimizer
from stepaudio_jax.training.setup import setup
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")
DIM = 4


class Affine(nnx.Module):
  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)) / din**0.5,
                       axes=("embed", None))
    self.b = nnx.Param(jnp.zeros((dout,)), axes=(None,))

  def __call__(self, x):
    return x @ self.w[...] + self.b[...][None]


@dataclasses.dataclass(frozen=True)
class ToyGanConfig:
  """The `toy_gan` section: known to the loader only through ToyGan.sections."""

  generator_lr: float = 1e-2
  discriminator_lr: float = 3e-3
  center: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
  notes: str = input_path(default="")  # not read: shows a path resolved against its file

  def __post_init__(self):
    if self.generator_lr <= 0 or self.discriminator_lr <= 0:
      raise ValueError("toy_gan.generator_lr and discriminator_lr must be positive")


class ToyGan(Task):
  """Generator maps noise to points; the discriminator scores points; `reference` is frozen."""

  progress_keys = ("discriminator/loss", "generator/loss")
  sections = {"toy_gan": ToyGanConfig}
  G_OPT = OptimizerConfig(learning_rate=1e-2, schedule="constant", embed_lr_multiplier=1,
                          weight_decay=0.0, grad_clip_norm=0)
  D_OPT = dataclasses.replace(G_OPT, learning_rate=3e-3)

  @classmethod
  def check_config(cls, cfg):
    if len(cfg.toy_gan.center) != DIM:
      raise ValueError(f"toy_gan.center needs {DIM} values, got {len(cfg.toy_gan.center)}")

  def models(self):
    opts = self.cfg.toy_gan
    g_opt = dataclasses.replace(self.G_OPT, learning_rate=opts.generator_lr)
    d_opt = dataclasses.replace(self.G_OPT, learning_rate=opts.discriminator_lr)
    return {
        "generator": Model(lambda rngs: Affine(DIM, DIM, rngs=rngs), optimizer=g_opt),
        "discriminator": Model(lambda rngs: Affine(DIM, 1, rngs=rngs), optimizer=d_opt),
        "reference": Model(lambda rngs: Affine(DIM, DIM, rngs=rngs), trainable=nnx.Nothing),
    }

  def batch_fields(self):
    return {"real": BatchField((self.cfg.train.batch_size, DIM), np.float32, ("act_batch", None))}

  def _fake(self, params, frozen, batch, rng):
    noise = jax.random.normal(rng, batch["real"].shape)
    ref = self.merge("reference", params, frozen)(noise)
    return self.merge("generator", params, frozen)(ref), noise

  def d_loss(self, params, frozen, batch, rng):
    fake, noise = self._fake(params, frozen, batch, rng)
    disc = self.merge("discriminator", params, frozen)
    per_row = (jax.nn.softplus(-disc(batch["real"])) + jax.nn.softplus(disc(fake)))[:, 0]
    total = per_row.sum()
    return total, {"loss_sum": total, "rows": jnp.float32(per_row.size),
                   "noise_sum": noise.sum()}

  def g_loss(self, params, frozen, batch, rng):
    fake, _ = self._fake(params, frozen, batch, rng)
    total = jax.nn.softplus(-self.merge("discriminator", params, frozen)(fake)).sum()
    return total, {"loss_sum": total, "rows": jnp.float32(fake.shape[0])}

  def updates(self):
    return (Update(("discriminator",), self.d_loss, "discriminator", "rows"),
            Update(("generator",), self.g_loss, "generator", "rows"))

  def make_source(self, split):
    return PointSource(self.cfg.train.batch_size, 1 if split == Split.EVAL else 0,
                       self.cfg.toy_gan.center)


register_task("toy_gan", ToyGan)


class PointSource(BatchSource):
  """Rows are a pure function of (split, step, row): a Gaussian blob around `center`."""

  def __init__(self, global_batch: int, split: int, center=(1.0, 2.0, 3.0, 4.0)):
    self.global_batch, self.split, self.step = global_batch, split, 0
    self.center = np.asarray(center)

  def next_local(self):
    rows = [np.random.default_rng([self.split, self.step, r]).normal(size=DIM) + self.center
            for r in process_rows(self.global_batch)]
    self.step += 1
    return {"real": np.stack(rows).astype(np.float32)}

  def restore(self, step, state):
    self.step = step

  def restart(self, at_step):
    self.step = 0


def _cfg(tmp_path, *overrides):
  return load_config(TINY, ["task=toy_gan", f"train.run_dir={tmp_path}",
                            "train.peak_flops_per_device=1e12",
                            "train.log_every=1", "mesh.data=2", "mesh.fsdp=4", *overrides])


def _hand_written_step(params, frozen, opt_state, rng, step, real):
  """The documented step, spelled out: D on its loss, then G on its loss with the new D; keys
  fold_in(fold_in(rng, step), update); each loss divided by its row count."""
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)

  def apply(name, params, frozen, x):
    p = params[name] or frozen[name]
    return x @ p["w"] + p["b"][None]

  def fake(params, k):
    noise = jax.random.normal(k, real.shape)
    return apply("generator", params, frozen, apply("reference", params, frozen, noise))

  def d_loss(d, k):
    p = {**params, "discriminator": d}
    return (jax.nn.softplus(-apply("discriminator", p, frozen, real))
            + jax.nn.softplus(apply("discriminator", p, frozen, fake(p, k)))).mean()

  def g_loss(g, k):
    p = {**params, "generator": g}
    return jax.nn.softplus(-apply("discriminator", p, frozen, fake(p, k))).mean()

  params, opt_state = dict(params), dict(opt_state)
  for i, (name, loss, cfg) in enumerate((("discriminator", d_loss, ToyGan.D_OPT),
                                         ("generator", g_loss, ToyGan.G_OPT))):
    grads = jax.grad(loss)(params[name], jax.random.fold_in(key, i))
    tx = make_optimizer(cfg, 10)
    updates, opt_state[name] = tx.update(grads, opt_state[name], params[name])
    params[name] = optax.apply_updates(params[name], updates)
  return params, opt_state


def test_alternating_updates_equal_the_hand_written_step(tmp_path):
  run = setup(_cfg(tmp_path, "train.steps=10"), donate=False)
  source = PointSource(8, 0)
  with jax.set_mesh(run.mesh):
    state = run.init()
  assert set(state.params) == {"generator", "discriminator", "reference"}
  assert state.params["reference"] == {} and set(state.frozen["reference"]) == {"w", "b"}
  assert set(state.opt_state) == {"generator", "discriminator"}  # no state for the frozen one
  frozen_before = jax.device_get(state.frozen)
  params, opt_state = jax.device_get(state.params), jax.device_get(state.opt_state)
  for step in range(3):
    real = source.next_local()["real"]
    state, metrics = run.train(state, jax.device_put({"real": real}, run.batch_shardings))
    params, opt_state = _hand_written_step(params, frozen_before, opt_state,
                                           jax.device_get(state.rng), step, real)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state.params), params)
  assert run.train._cache_size() == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)
  for name in ("discriminator/loss", "generator/loss", "discriminator/grad_norm",
               "learning_rate/generator", "learning_rate/discriminator"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["learning_rate/discriminator"]) == pytest.approx(3e-3)


def test_every_step_and_microbatch_draws_fresh_noise(tmp_path):
  """The same batch at steps 0 and 1 sees different noise; the same step replayed sees the same."""
  run = setup(_cfg(tmp_path, "train.grad_accum_steps=2"), donate=False)
  with jax.set_mesh(run.mesh):
    state = run.init()
  batch = jax.device_put(PointSource(8, 0).next_local(), run.batch_shardings)
  s1, m0 = run.train(state, batch)
  _, m0_again = run.train(state, batch)
  _, m1 = run.train(s1, batch)
  assert float(m0["discriminator/noise_sum"]) == float(m0_again["discriminator/noise_sum"])
  assert float(m0["discriminator/noise_sum"]) != float(m1["discriminator/noise_sum"])
  # Two microbatches of 4 rows: their noise must differ, or the sum is twice one draw's.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 0)
  halves = [float(jax.random.normal(jax.random.fold_in(key, j), (4, DIM)).sum()) for j in (0, 1)]
  assert float(m0["discriminator/noise_sum"]) == pytest.approx(sum(halves), rel=1e-5)


def test_trainer_runs_evaluates_checkpoints_and_resumes_any_task(tmp_path):
  """4 steps straight, or 2 then resumed for 2: the same metrics; eval runs; nothing in the
  trainer names the task."""
  common = ["checkpoint.every=2", "train.eval_every=2", "train.eval_batches=2"]
  lines = []
  full = train(_cfg(tmp_path / "full", "train.steps=4", *common),
               print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
  assert [h["step"] for h in full] == [1, 2, 3, 4]
  assert sum(line.startswith("eval step") for line in lines) == 2
  assert any(line.startswith("step 4/4 discriminator/loss") for line in lines), lines
  train(_cfg(tmp_path / "cut", "train.steps=2", *common), print_fn=lambda *a, **k: None)
  resumed = train(_cfg(tmp_path / "cut", "train.steps=4", *common),
                  print_fn=lambda *a, **k: None)
  assert [h["step"] for h in resumed] == [3, 4]
  for a, b in zip(full[2:], resumed):
    assert a == b


class CountedToyGan(ToyGan):
  """Reports its throughput in points, 8 a step."""

  throughput_unit = "points"

  def items_per_step(self):
    return float(self.cfg.train.batch_size)


def test_a_callers_hooks_run_every_n_steps_after_the_built_in_ones(tmp_path):
  """Every(2, fn) over 4 steps: steps 2 and 4, with finite host metrics and the state of that
  step, after the built-in hooks of that step (the metrics hook logged the step before, eval
  wrote this one), in the order given; the rate is named for its unit."""
  seen, lines = [], []

  def record(name):
    def fn(step, state, metrics):
      with open(tmp_path / EVAL_METRICS) as f:
        evaluated = json.load(f)["step"]
      logged = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step")]
      seen.append((name, step, int(jax.device_get(state.step)), evaluated, logged[-1]))
      assert metrics and all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
      assert {"discriminator/loss", "generator/grad_norm"} <= set(metrics)
    return fn

  history = train(_cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "train.eval_every=2",
                       "train.eval_batches=1"),
                  print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))),
                  task=CountedToyGan, hooks=[Every(2, record("a")), Every(4, record("b"))])
  assert [h["step"] for h in history] == [1, 2, 3, 4]
  assert seen == [("a", 2, 2, 2, 1), ("a", 4, 4, 4, 3), ("b", 4, 4, 4, 3)]
  assert "points/s" in next(line for line in lines if line.startswith("step 4/4"))
  logged = [json.loads(x) for x in open(tmp_path / METRICS_FILE)]
  train_lines = [x for x in logged if x["kind"] == "train"]
  assert all(x["points_per_second"] > 0 and "tokens_per_second" not in x for x in train_lines)
  with pytest.raises(ValueError, match=r"Every\(n, fn\) needs n >= 1, got 0"):
    Every(0, record("c"))


class StoppingToyGan(ToyGan):
  def stop_reason(self, metrics):
    if metrics["discriminator/loss"] > 0:  # softplus losses: always
      return f"discriminator/loss {metrics['discriminator/loss']:.2f} is positive"
    return None


@pytest.mark.parametrize("every", [1, 100])
def test_a_task_stop_condition_stops_the_run_unsaved(tmp_path, every):
  """Met at step 1: checked before the save of step 1 (checkpoint.every=1) or by the metrics
  hook a step later; either way step 1 is never checkpointed."""
  with pytest.raises(FloatingPointError, match=r"^step 1: discriminator/loss \d\.\d\d is "
                     r"positive; stopping without checkpointing it \(no checkpoint was written\)$"):
    train(_cfg(tmp_path, "train.steps=3", f"checkpoint.every={every}"),
          print_fn=lambda *a, **k: None, task=StoppingToyGan)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


# A config of each built-in task, as small as the repository has.
TASK_CONFIGS = {"pretrain": "configs/tiny.yaml", "sft": "configs/speech/tts_lm_tiny.yaml",
                "reward": "configs/reward/corpus.yaml", "ppo": "configs/ppo/corpus.yaml",
                "flow": "configs/speech/flow_tiny.yaml",
                "vocoder": "configs/speech/vocoder_tiny.yaml"}


@pytest.mark.parametrize("name", sorted(TASK_CONFIGS))
def test_a_tasks_optimizer_keys_are_the_sections_its_models_train_with(name):
  """What the divergence advice names (Task.optimizer_keys) is the optimizers the task's models
  use, each once: a flow run's is flow.optimizer, not `optimizer:`."""
  cfg = load_config(os.path.join(REPO, TASK_CONFIGS[name]))
  task = task_class(name)(cfg, None)
  used = [m.optimizer for m in task.models().values() if m.optimizer is not None]
  named = [functools.reduce(getattr, k.split("."), cfg) for k in task.optimizer_keys]
  assert all(isinstance(o, OptimizerConfig) for o in named), task.optimizer_keys
  assert sorted(map(id, named)) == sorted(map(id, used)), task.optimizer_keys


def test_the_divergence_advice_names_the_tasks_optimizers():
  with pytest.raises(FloatingPointError, match=(
      r"^generator/loss became nan at step 3; stopping without checkpointing it \(the newest "
      r"checkpoint is step 2: resume from it with a lower learning_rate or grad_clip_norm in "
      r"vocoder\.generator_optimizer or vocoder\.discriminator_optimizer, or look at the data "
      r"of that step\)$")):
    check_finite(3, {"generator/mel_l1": 1.0, "generator/loss": float("nan")}, 2, None,
                 task_class("vocoder").optimizer_keys)
  with pytest.raises(FloatingPointError, match=r"with a lower optimizer\.learning_rate or "
                                               r"optimizer\.grad_clip_norm, or"):
    check_finite(3, {"loss": float("inf")}, None)


def test_the_default_metrics_divide_by_the_updates_denominator():
  task = ToyGan(_cfg("/tmp/unused"), None)
  sums = {"loss_sum": jnp.float32(6.0), "rows": jnp.float32(3.0), "tokens": jnp.float32(2.0)}
  out = task.metrics(sums, task.updates()[0])
  assert float(out["loss"]) == 2.0 and float(out["rows"]) == 3.0 and "loss_sum" not in out


class RowToyGan(ToyGan):
  """One update of the discriminator in 2 passes of `MINIBATCHES` minibatches, whose loss
  reports the rows it sees (row r of the batch has real[r, 0] == r)."""

  MINIBATCHES = 1

  def updates(self):
    def loss(params, frozen, batch, rng):
      jax.debug.callback(lambda rows: self.seen.append(np.asarray(rows).astype(int).tolist()),
                         batch["real"][:, 0], ordered=True)
      return self.d_loss(params, frozen, batch, rng)

    return (Update(("discriminator",), loss, "discriminator", "rows", epochs=2,
                   minibatches=self.MINIBATCHES),)


@pytest.mark.parametrize("minibatches", [1, 2, 4])
def test_map_first_pass_sees_the_minibatches_the_first_pass_trains_on(tmp_path, minibatches):
  task = type("Rows", (RowToyGan,), {"MINIBATCHES": minibatches, "seen": []})
  run = setup(_cfg(tmp_path, "mesh.data=1", "mesh.fsdp=1"), jax.devices()[:1], task=task,
              donate=False)  # ordered callbacks need one device
  with jax.set_mesh(run.mesh):
    state = run.init()
    real = np.zeros((8, DIM), np.float32)
    real[:, 0] = np.arange(8)
    jax.block_until_ready(run.train(state, jax.device_put({"real": real},
                                                          run.batch_shardings)))
  trained = task.seen[:minibatches]  # the first pass; the second is shuffled
  assert len(task.seen) == 2 * minibatches
  assert sorted(sum(task.seen[minibatches:], [])) == list(range(8))
  # Each row of map_first_pass's output: the whole block (minibatch) the row was in.
  rows = jnp.arange(8, dtype=jnp.float32)
  blocks = map_first_pass(lambda r: jnp.broadcast_to(r, (r.shape[0], r.shape[0])),
                          minibatches, rows)
  size = 8 // minibatches
  assert [np.asarray(blocks[k * size]).astype(int).tolist() for k in range(minibatches)] \
      == trained
  for k, block in enumerate(trained):
    for r in block:
      assert np.asarray(blocks[r]).astype(int).tolist() == block, (k, r)


def test_optimizer_state_shardings_follow_parameters_or_fail_loudly():
  mesh = jax.make_mesh((8,), ("fsdp",))
  params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  sharding = {"w": NamedSharding(mesh, PartitionSpec("fsdp"))}
  replicated = NamedSharding(mesh, PartitionSpec())

  def shardings(tx):
    abstract = jax.eval_shape(tx.init, params)
    return state_lib.opt_state_shardings("m", Optimizer(tx, lambda s: 0.0), abstract, params,
                                         sharding, replicated)

  adam = shardings(optax.adamw(1e-3))
  assert adam[0].mu["w"] == sharding["w"] and adam[0].count == replicated

  # State that is not parameter-shaped (a statistic of fixed size) cannot follow a parameter.
  def init(p):
    return {"stats": jnp.zeros((16,))}

  odd = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
  with pytest.raises(ValueError, match=r"model 'm'.*shape \(16,\).*matches no parameter"):
    shardings(odd)


def test_batch_fields_are_sharded_as_declared_not_by_rank(tmp_path):
  """With the sequence rule on `tensor`, tokens split their length but images keep theirs."""
  cfg = load_config(TINY, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                           "mesh.rules.act_length=[tensor]"])
  run = setup(cfg)
  assert run.batch["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"), "tensor")
  assert run.batch["images"].sharding.spec == PartitionSpec(("data", "fsdp"), None, None, None,
                                                            None)


def test_task_is_chosen_by_config_and_unknown_names_are_refused(tmp_path):
  cfg = load_config(TINY, ["task=pretrain"])
  assert all(issubclass(task_class(name), Task) for name in task_names())
  assert type(setup(cfg).task).__name__ == "PretrainTask"
  yaml = tmp_path / "bad.yaml"
  yaml.write_text(f"base: {TINY}\ntask: dpo\n")
  with pytest.raises(ConfigError, match=r"task='dpo' is not a registered task; known tasks: "
                                        r"\[.*'pretrain'.*\].*task set in .*bad.yaml"):
    load_config(str(yaml))


def test_a_task_defined_here_is_set_from_yaml(tmp_path):
  """ToyGan's section is checked like a built-in one: values and types, unknown keys named with
  their file, input paths against the file, the task's cross-section check; then it trains."""
  text = (f"base: {TINY}\ntask: toy_gan\nmesh:\n  data: 2\n  fsdp: 4\n"
          f"train:\n  run_dir: {tmp_path / 'run'}\n  steps: 2\n  log_every: 1\n"
          "toy_gan:\n  discriminator_lr: 1.0e-3\n  center: [0, 0, 0, 5]\n"
          "  notes: notes/toy.txt\n")
  (tmp_path / "toy.yaml").write_text(text)
  cfg = load_config(str(tmp_path / "toy.yaml"))
  assert type(setup(cfg).task) is ToyGan
  assert cfg.toy_gan == ToyGanConfig(discriminator_lr=1e-3, center=[0.0, 0.0, 0.0, 5.0],
                                     notes=str(tmp_path / "notes" / "toy.txt"))
  history = train(cfg, print_fn=lambda *a, **k: None)
  assert history[-1]["learning_rate/discriminator"] == pytest.approx(1e-3)
  assert history[-1]["learning_rate/generator"] == pytest.approx(1e-2)
  (tmp_path / "typo.yaml").write_text(text + "  lr: 3\n")
  with pytest.raises(ConfigError, match=r"typo.yaml: Key 'lr' not in 'ToyGanConfig'.*toy_gan.lr"):
    load_config(str(tmp_path / "typo.yaml"))
  with pytest.raises(ConfigError, match=r"command line.*toy_gan.generator_lr"):
    load_config(str(tmp_path / "toy.yaml"), ["toy_gan.generator_lr=fast"])
  with pytest.raises(ConfigError, match=r"toy_gan.center needs 4 values, got 2; "
                                        r"toy_gan.center set in command line"):
    load_config(str(tmp_path / "toy.yaml"), ["toy_gan.center=[1,2]"])
  with pytest.raises(ConfigError, match=r"section 'toy_gan' belongs to task toy_gan, not to "
                                        r"this run's task 'pretrain'"):
    load_config(str(tmp_path / "toy.yaml"), ["task=pretrain"])
