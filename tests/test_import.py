"""Import of public Hugging Face models: a Llama LM and a SigLIP vision tower, against transformers."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from stepaudio_jax.config.model import VisionConfig
from stepaudio_jax.export import vision_import  # noqa: E402
from stepaudio_jax.export.hf_import import import_hf  # noqa: E402
from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError  # noqa: E402
from stepaudio_jax.export.score import score  # noqa: E402
from stepaudio_jax.models.vision import VisionEncoder  # noqa: E402
from tests.conftest import REPO  # noqa: E402

TINY = os.path.join(REPO, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=4)
  model = transformers.SiglipVisionModel(cfg).eval()
  with torch.no_grad():  # non-trivial LayerNorms and biases, so every tensor is checked
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  out = str(tmp_path_factory.mktemp("siglip"))
  model.save_pretrained(out)
  return out, model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch.manual_seed(1)
  cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, max_position_embeddings=512, rope_theta=1000.0,
                                 initializer_range=0.1, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  out = str(tmp_path_factory.mktemp("llama"))
  model.save_pretrained(out)
  return out, model


def test_siglip_vision_encoder_matches_transformers(siglip_dir):
  directory, model = siglip_dir
  fields = {k.split(".", 1)[1]: v for k, v in vision_import.siglip_vision_config(directory).items()}
  cfg = VisionConfig(**fields)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0))))
  params = vision_import.siglip_vision_params(directory, cfg.num_layers)
  nnx.replace_by_pure_dict(state, params)
  encoder = nnx.merge(graphdef, state)
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  ours = np.asarray(encoder(jnp.asarray(pixels)))
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
  diff = np.abs(ours - theirs.numpy()).max()
  print(f"SigLIP last_hidden_state parity: max |diff| {diff:.2e} (output std {ours.std():.2f})")
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)


def test_llama_import_with_siglip_matches_transformers(llama_dir, siglip_dir, tmp_path):
  (lm_dir, lm), (vision_dir, _) = llama_dir, siglip_dir
  run = str(tmp_path / "run")
  import_hf(lm_dir, run, config=TINY, overrides=["train.seq_len=32"], vision_dir=vision_dir)
  tokens = [1, 17, 300, 5, 99, 42, 511, 3]
  ours = score(run, tokens)
  with torch.no_grad():
    theirs = lm(torch.tensor([tokens])).logits[0].numpy()
  print(f"Llama import parity: max |dlogit| {np.abs(ours - theirs).max():.2e}")
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  reader = CheckpointReader(run)
  expected = vision_import.siglip_vision_params(vision_dir, 2)
  np.testing.assert_array_equal(reader.read(("frozen", "model", "vision_encoder", "layers", "wq")),
                                expected["layers"]["wq"])
  np.testing.assert_array_equal(reader.read(("frozen", "model", "vision_encoder", "patch_w")),
                                expected["patch_w"])


def test_clip_is_rejected_with_the_reason(tmp_path):
  cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=4)
  cfg.save_pretrained(str(tmp_path))
  with pytest.raises(ExportError, match="CLIP vision towers"):
    vision_import.siglip_vision_config(str(tmp_path))
