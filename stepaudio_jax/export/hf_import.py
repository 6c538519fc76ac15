"""`stepaudio import`: a public Step1 (or Llama) safetensors model -> a trainer run directory.

The result is RUN_DIR/config.yaml plus RUN_DIR/checkpoints/0: a complete train state at step 0
(imported LM, fresh optimizer moments, the config's projector and image encoder, or a SigLIP
encoder with --vision), so `stepaudio train RUN_DIR/config.yaml` resumes from it and
`checkpoint.init_from=RUN_DIR` starts another run from it. Every parameter is built shard by
shard on the configured mesh straight from the memory-mapped safetensors: a host reads only the
slices its devices hold (one layer of one tensor at a time). A text-only source (vocabulary
smaller than the config's) is grown with expand_vocabulary.
"""

import functools
import json
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np

from stepaudio_jax.config import RunConfig, dump_config
from stepaudio_jax.export import step1_layout as layout, vision_import
from stepaudio_jax.export.orbax_reader import ExportError
from stepaudio_jax.export.safetensors_io import SafetensorsDir
from stepaudio_jax.models.omni import expand_vocabulary
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.checkpoint import Checkpointer
from stepaudio_jax.training.setup import setup
from stepaudio_jax.training.state import TrainState

log = logging.getLogger(__name__)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
MODEL = "model"  # the pretraining task's one model: Step-Omni


def read_hf_config(hf_dir: str) -> tuple[dict, str]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ExportError(f"{path} does not exist; HF_DIR must hold config.json and safetensors")
  with open(path) as f:
    try:
      hf = json.load(f)
    except ValueError as e:
      raise ExportError(f"{path}: not valid JSON ({e}); HF_DIR must hold the model's "
                        "config.json") from None
  if not isinstance(hf, dict):
    raise ExportError(f"{path}: the top level must be an object of model fields")
  return hf, path


def resolve_config(hf: dict, hf_path: str, config: str, overrides: Sequence[str],
                   vision: dict) -> tuple[RunConfig, int]:
  """The run config: config file, then config.json's shapes, then the user's overrides.

  The vocabulary is the larger of the source's and the config's (never shrunk); returns the
  config and the source's vocabulary size.
  """
  try:
    from_hf = layout.model_overrides(hf, hf_path)
  except ValueError as e:
    raise ExportError(str(e)) from e
  src_vocab = from_hf.pop("model.vocab_size")
  items = [f"{k}={v}" for k, v in {**from_hf, **vision}.items()] + list(overrides)
  cfg = load_config(config, items)
  if src_vocab > cfg.model.vocab_size:
    cfg = load_config(config, items + [f"model.vocab_size={src_vocab}"])
  return cfg, src_vocab


def check_token_layout(hf_dir: str, cfg: RunConfig) -> None:
  """An export says where its text, audio and image ids lie (tokenizer_config.json); a config
  that puts them elsewhere would read every audio code as another token, so it is refused."""
  path = os.path.join(hf_dir, "tokenizer_config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    theirs = json.load(f).get("token_layout")
  if not theirs:
    return
  ours = layout.tokenizer_config(cfg.model, cfg.tokens, False)["token_layout"]
  keys = ("text", "audio_linguistic", "audio_semantic", "image_placeholder")
  differ = [k for k in keys if k in theirs and list(np.ravel(theirs[k])) != list(np.ravel(ours[k]))]
  if differ:
    k = differ[0]
    raise ExportError(
        f"{path}: token_layout.{k} is {theirs[k]} but the config puts it at {ours[k]}; import "
        "with a config whose tokens section matches the export (tokens.text_vocab_size, "
        "tokens.linguistic_codes, tokens.semantic_codes; e.g. the run config that trained it)")


def _source_name(name: str, hf: dict, tensors: SafetensorsDir) -> str:
  """Tied Llama models ship no lm_head: it is the embedding."""
  if name == "lm_head.weight" and name not in tensors and hf.get("tie_word_embeddings"):
    return "model.embed_tokens.weight"
  return name


def check_tensors(maps, hf: dict, tensors: SafetensorsDir, hf_dir: str, src_vocab: int) -> None:
  for m in maps:
    src = _source_name(m.name, hf, tensors)
    if src not in tensors:
      raise ExportError(
          f"{hf_dir}: tensor {m.name} is missing from the safetensors (config.json says "
          f"{hf.get('num_hidden_layers')} layers); is the checkpoint complete?"
      )
    want = m.public_shape
    if m.name in VOCAB_TENSORS:
      want = (src_vocab,) + want[1:]
    got = tensors.get(src).shape
    if got != want:
      raise ExportError(
          f"{tensors.file_of(src)}: tensor {src} has shape {list(got)} but "
          f"{os.path.join(hf_dir, 'config.json')} implies {list(want)}; the config does not match "
          "the weights"
      )


def _lm_sources(cfg: RunConfig, hf: dict, tensors: SafetensorsDir, src_vocab: int,
                seed: int) -> dict:
  """For each of our LM arrays, fn(index) -> that slice as float32, read lazily per layer."""
  maps = layout.tensor_maps(cfg.model)
  by_path: dict[tuple, dict[int | None, layout.TensorMap]] = {}
  for m in maps:
    by_path.setdefault(m.ours, {})[m.layer] = m

  def view(m: layout.TensorMap) -> np.ndarray:
    return m.to_ours(tensors.get(_source_name(m.name, hf, tensors)))

  expanded = {}
  if src_vocab < cfg.model.vocab_size:
    small = {"lm": {"embed": np.asarray(view(by_path[("embed",)][None]), np.float32),
                    "lm_head": np.asarray(view(by_path[("lm_head",)][None]), np.float32)}}
    expanded = expand_vocabulary(small, cfg.model.vocab_size, jax.random.key(seed + 7))["lm"]
    log.warning("expanded the vocabulary from %d to %d", src_vocab, cfg.model.vocab_size)

  def source(ours: tuple, layers: dict, index: tuple) -> np.ndarray:
    if ours[-1] in expanded:
      return expanded[ours[-1]][index]
    if None in layers:
      return np.asarray(view(layers[None])[index], np.float32)
    rows = range(cfg.model.num_layers)[index[0]]
    return np.stack([np.asarray(view(layers[i])[index[1:]], np.float32) for i in rows])

  return {ours: functools.partial(source, ours, layers) for ours, layers in by_path.items()}


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def import_hf(hf_dir: str, run_dir: str, *, config: str = "configs/base.yaml",
              overrides: Sequence[str] = (), vision_dir: str = "") -> str:
  """Write run_dir/config.yaml and run_dir/checkpoints/0; returns the step directory."""
  hf, hf_path = read_hf_config(hf_dir)
  vision = vision_import.siglip_vision_config(vision_dir) if vision_dir else {}
  cfg, src_vocab = resolve_config(hf, hf_path, config, [*overrides, f"train.run_dir={run_dir}"],
                                  vision)
  check_token_layout(hf_dir, cfg)
  tensors = SafetensorsDir(hf_dir)
  check_tensors(layout.tensor_maps(cfg.model), hf, tensors, hf_dir, src_vocab)
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ExportError(f"{ckpt_dir} already holds checkpoints; import into a new directory")

  run = setup(cfg)
  abstract, shardings = run.abstract_state, run.state_shardings
  lm = jax.tree.map(lambda x: None, abstract.params[MODEL]["lm"])
  for ours, fn in _lm_sources(cfg, hf, tensors, src_vocab, cfg.train.seed).items():
    target = functools.reduce(lambda t, k: t[k], ours, abstract.params[MODEL]["lm"])
    _set(lm, ours, jax.make_array_from_callback(
        target.shape, target.sharding, lambda idx, fn=fn, dt=target.dtype: fn(idx).astype(dt)))

  # Everything but the LM comes from the seed; XLA drops the unused LM initialisers.
  rest_sh = (shardings.params, shardings.frozen, shardings.rng)
  with jax.set_mesh(run.mesh):
    params, frozen, rng = jax.jit(lambda: (lambda s: (s.params, s.frozen, s.rng))(run.init()),
                                  out_shardings=rest_sh)()
  params = {**params, MODEL: {**params[MODEL], "lm": lm}}
  if vision_dir:
    enc = vision_import.siglip_vision_params(vision_dir, cfg.vision.num_layers)
    frozen = {**frozen, MODEL: {**frozen[MODEL], "vision_encoder": jax.device_put(
        enc, shardings.frozen[MODEL]["vision_encoder"])}}
  with jax.set_mesh(run.mesh):
    opt_state = {name: jax.jit(opt.tx.init, out_shardings=shardings.opt_state[name])(params[name])
                 for name, opt in run.optimizers.items()}
  state = TrainState(step=jax.device_put(np.zeros((), np.int32), shardings.step),
                     params=params, frozen=frozen, opt_state=opt_state, rng=rng)

  os.makedirs(run_dir, exist_ok=True)
  if jax.process_index() == 0:
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
  ckpt = Checkpointer(run_dir, cfg.checkpoint)
  ckpt.save(0, state, {"step": 0}, force=True)
  ckpt.wait()
  ckpt.close()
  return os.path.join(ckpt_dir, "0")
