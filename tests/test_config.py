"""Config files, inheritance, overrides and errors that name the key and the file."""

import os

import pytest

from stepaudio_jax.config import ConfigError, dump_config
from stepaudio_jax.tasks.registry import load_config


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_public_model_configs_carry_the_published_numbers():
  big = load_config("configs/model/step1-130b.yaml").model
  assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.head_dim,
          big.intermediate_size, big.vocab_size, big.max_seq_len, big.rms_norm_eps) == (
              12288, 88, 96, 8, 128, 31232, 74752, 32768, 1e-5)
  tts = load_config("configs/model/step-audio-tts-3b.yaml").model
  assert (tts.hidden_size, tts.num_layers, tts.num_heads, tts.num_kv_heads, tts.head_dim,
          tts.intermediate_size, tts.vocab_size, tts.max_seq_len, tts.rms_norm_eps) == (
              3072, 32, 48, 4, 64, 8192, 74752, 32768, 1e-5)
  tokens = load_config("configs/model/step1-130b.yaml").tokens
  assert (tokens.linguistic_offset, tokens.semantic_offset, tokens.audio_tokens) == (
      65536, 65536 + 1024, 5120)


def test_inheritance_and_overrides(tmp_path):
  _write(tmp_path, "base.yaml", "model:\n  num_layers: 3\n  hidden_size: 64\n")
  child = _write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  num_layers: 5\n")
  cfg = load_config(child, ["train.steps=7", "model.remat=save_dots"])
  assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.steps) == (5, 64, 7)
  assert cfg.model.remat.value == "save_dots"


def test_unknown_key_names_key_and_file(tmp_path):
  path = _write(tmp_path, "bad.yaml", "base: " + os.path.abspath("configs/tiny.yaml")
                + "\nmodel:\n  num_layer: 3\n")
  with pytest.raises(ConfigError, match=r"bad.yaml.*num_layer.*model.num_layer"):
    load_config(path)


def test_wrong_type_names_key(tmp_path):
  with pytest.raises(ConfigError, match=r"command line.*train.steps"):
    load_config("configs/tiny.yaml", ["train.steps=many"])


def test_impossible_value_names_keys_and_sources():
  with pytest.raises(ConfigError) as e:
    load_config("configs/tiny.yaml", ["model.num_kv_heads=3"])
  msg = str(e.value)
  assert "num_heads=4 is not divisible by num_kv_heads=3" in msg
  assert "model.num_kv_heads set in command line" in msg
  assert "model.num_heads set in configs/tiny.yaml" in msg


def test_mesh_must_divide_devices():
  with pytest.raises(ConfigError, match=r"mesh.*needs 12 devices but 8"):
    load_config("configs/tiny.yaml", ["mesh.data=3", "mesh.fsdp=4"], num_devices=8)
  with pytest.raises(ConfigError, match=r"mesh.fsdp=-1 cannot fill 8 devices"):
    load_config("configs/tiny.yaml", ["mesh.data=3"], num_devices=8)


def test_batch_must_divide_over_processes():
  with pytest.raises(ConfigError, match=r"batch_size=8 does not divide over 3 processes.*"
                                        r"train.batch_size set in configs/tiny.yaml"):
    load_config("configs/tiny.yaml", num_processes=3)


def test_cross_section_checks():
  with pytest.raises(ConfigError, match="model.vocab_size=400 is below"):
    load_config("configs/tiny.yaml", ["model.vocab_size=400"])
  with pytest.raises(ConfigError, match="train.seq_len=1024 exceeds model.max_seq_len=512"):
    load_config("configs/tiny.yaml", ["train.seq_len=1024"])


def test_missing_file_and_bad_override():
  with pytest.raises(ConfigError, match="does not exist"):
    load_config("configs/nope.yaml")
  with pytest.raises(ConfigError, match="section.key=value"):
    load_config("configs/tiny.yaml", ["train.steps"])


def test_yaml_is_loaded_safely(tmp_path):
  path = _write(tmp_path, "evil.yaml", "train: !!python/object/apply:os.system ['echo hi']\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(path)


def test_circular_base(tmp_path):
  _write(tmp_path, "a.yaml", "base: b.yaml\n")
  _write(tmp_path, "b.yaml", "base: a.yaml\n")
  with pytest.raises(ConfigError, match="circular"):
    load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("path", ["configs/tiny.yaml", "configs/demo.yaml",
                                  "configs/model/step1-130b.yaml"])
def test_dump_roundtrip(tmp_path, path):
  cfg = load_config(path)
  out = str(tmp_path / "resolved.yaml")
  dump_config(cfg, out)
  assert load_config(out) == cfg


@pytest.mark.parametrize("override,message", [
    ("optimizer.grad_clip_norm=-1", "grad_clip_norm must be >= 0"),
    ("optimizer.weight_decay=-5", "weight_decay"),
    ("optimizer.b1=2", "b1=2"),
    ("train.eval_every=-3", "eval_every"),
    ("train.eval_batches=0", "eval_batches must be positive"),
    ("data.codebooks=both", r"data.codebooks='both' is not one of \['dual', 'semantic'"),
    ("data.share_tolerance=0", r"data.share_tolerance must be in \(0, 1\), got 0"),
])
def test_values_that_cannot_be_right_are_refused(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config("configs/tiny.yaml", [override])


def test_grain_eval_needs_held_out_shards():
  with pytest.raises(ConfigError, match=r"data.eval_shards has no globs for \['text'\]"):
    load_config("configs/corpus.yaml", ["data.eval_shards.text=[]"])
  # Without eval the check is off: the run loads, text with no held-out globs, the rest kept.
  cfg = load_config("configs/corpus.yaml", ["data.eval_shards.text=[]", "train.eval_every=0"])
  assert cfg.train.eval_every == 0 and cfg.data.eval_shards["text"] == []
  assert len(cfg.data.eval_shards["asr"]) == 1


def test_a_section_of_another_task_is_refused(tmp_path):
  """`ppo.kl_coef` on a pretraining run would be silently ignored; it names its task instead."""
  with pytest.raises(ConfigError, match=r"command line: section 'ppo' belongs to task ppo, not "
                                        r"to this run's task 'pretrain'.*set task=ppo"):
    load_config("configs/tiny.yaml", ["ppo.kl_coef=0.1"])
  path = _write(tmp_path, "sft.yaml", "base: " + os.path.abspath("configs/sft/corpus_tts.yaml")
                + "\nvocoder:\n  segment: 4096\n")
  with pytest.raises(ConfigError, match=r"sft.yaml: section 'vocoder' belongs to task vocoder"):
    load_config(path)
  with pytest.raises(ConfigError, match=r"unknown section 'trian'; a pretrain run reads \[.*"
                                        r"'train'"):
    load_config("configs/tiny.yaml", ["trian.steps=3"])


def test_lm_checks_belong_to_the_lm_tasks():
  """The vocabulary check refuses an LM config; a vocoder run has no LM, so no LM check runs."""
  with pytest.raises(ConfigError, match="model.vocab_size=10 is below"):
    load_config("configs/tiny.yaml", ["model.vocab_size=10"])
  cfg = load_config("configs/speech/vocoder_tiny.yaml", ["model.vocab_size=10",
                                                          "model.max_seq_len=8"])
  assert cfg.train.seq_len > cfg.model.max_seq_len  # another LM check, not run either
  assert sorted(cfg.sections) == ["mel", "speech_data", "vocoder"]


def test_a_task_section_is_read_as_an_attribute_and_dumped_at_the_top_level(tmp_path):
  cfg = load_config("configs/ppo/corpus.yaml", ["ppo.kl_coef=0.125"])
  assert cfg.ppo.kl_coef == 0.125 and list(cfg.sections) == ["ppo"]
  with pytest.raises(AttributeError, match="task 'ppo' has no section 'flow'"):
    _ = cfg.flow
  out = str(tmp_path / "config.yaml")
  dump_config(cfg, out)
  assert "\nppo:\n" in open(out).read() and "sections" not in open(out).read()
  assert load_config(out) == cfg


def test_input_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
  """Data paths in configs/corpus.yaml resolve against the file, as `base:` does, so the corpus
  config works from any working directory."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.chdir(tmp_path)
  cfg = load_config(os.path.join(repo, "configs", "corpus.yaml"),
                    ["data.tokenizer_model=relative/spm.model"])
  assert cfg.data.shards["text"] == [
      os.path.join(repo, "data_pipelines", "corpus", "text", "train-*.array_record")]
  assert cfg.data.tokenizer_model == "relative/spm.model"  # the command line: the cwd's
  dumped = str(tmp_path / "run" / "config.yaml")
  os.makedirs(os.path.dirname(dumped))
  dump_config(cfg, dumped)
  assert load_config(dumped).data.shards == cfg.data.shards


def test_a_missing_base_names_the_file_that_asked_for_it(tmp_path):
  path = _write(tmp_path, "child.yaml", "base: parent.yaml\n")
  with pytest.raises(ConfigError, match=r"child.yaml: base 'parent.yaml' does not exist"):
    load_config(path)


def test_one_setting_decides_the_run_length(tmp_path):
  """train.steps=4 on an epoch-based run (SFT: train.epochs; reward: reward.stages' epochs)
  and train.epochs on a task that reads no epochs would be ignored, so they are refused, naming
  both keys; a train.steps inherited from a base below the epochs' layer is overridden."""
  sft, reward = "configs/sft/corpus_aqta.yaml", "configs/reward/corpus.yaml"
  with pytest.raises(ConfigError, match=r"train.steps=4 \(set in command line\) would be "
                                        r"ignored: train.epochs=1 \(set in .*corpus_aqta.yaml\) "
                                        r"decides .*set train.epochs=0"):
    load_config(sft, ["train.steps=4"])
  with pytest.raises(ConfigError, match=r"train.steps=4 \(set in command line\) would be "
                                        r"ignored: reward.stages \(set in .*reward/corpus.yaml"):
    load_config(reward, ["train.steps=4"])
  with pytest.raises(ConfigError, match=r"train.epochs=2 \(set in command line\) does not "
                                        r"apply to a reward run: reward.stages"):
    load_config(reward, ["train.epochs=2"])
  with pytest.raises(ConfigError, match=r"train.epochs=2 .* does not apply to a flow run: "
                                        r"train.steps decides"):
    load_config("configs/speech/flow_tiny.yaml", ["train.epochs=2"])
  both = _write(tmp_path, "both.yaml", f"base: {os.path.abspath(sft)}\ntrain:\n  steps: 9\n"
                                       "  epochs: 2\n")
  with pytest.raises(ConfigError, match=r"train.steps=9 \(set in .*both.yaml\)"):
    load_config(both)
  # corpus.yaml's steps: 200 sits below the layer that sets epochs (or stages): overridden.
  assert load_config(sft).train.epochs == 1 and load_config(reward).reward.stages
  assert load_config(sft, ["train.epochs=0", "train.steps=7"]).train.steps == 7


@pytest.mark.parametrize("overrides,needle", [
    (["mesh.tensor=8"], r"model.num_heads=4 does not split over mesh.tensor=8 \(mesh.rules.heads"),
    (["mesh.tensor=2", "mesh.sequence=4"],
     r"model.num_heads=4 does not split over mesh.tensor=2 x mesh.sequence=4"),
    (["mesh.tensor=3"], r"model.num_heads=4 does not split over mesh.tensor=3"),
])
def test_a_mesh_that_cannot_split_the_model_is_refused_at_load(overrides, needle):
  """Refused when the config loads, so a dry run (launch/submit.py) refuses it too."""
  with pytest.raises(ConfigError, match=needle + r".*mesh.tensor set in command line"):
    load_config("configs/tiny.yaml", overrides)


def test_image_shares_without_vision_stop_training_in_one_line(tmp_path, capsys):
  """configs/corpus.yaml vision.enabled=false stops training before a step in one error line
  (exit 2), not with a traceback; the config still loads for what reads no data (compile,
  import), and without image shares it trains."""
  from stepaudio_jax import cli

  assert not load_config("configs/corpus.yaml", ["vision.enabled=false"]).vision.enabled
  code = cli.main(["train", "configs/corpus.yaml", "vision.enabled=false",
                   f"train.run_dir={tmp_path}"])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err, err
  (line,) = [ln for ln in err.splitlines() if ln.startswith("stepaudio train: error:")]
  assert ("data.stages [0, 1, 2] give image_text a share but vision.enabled=false: set image: 0"
          in line), line


@pytest.mark.parametrize("path", ["configs/sft/corpus_aqta.yaml", "configs/reward/corpus.yaml",
                                  "configs/speech/tts_lm_tiny.yaml"])
def test_a_runs_own_config_loads_back_when_epochs_decide_its_length(tmp_path, path):
  """The resolved config holds train.steps beside the keys that decide the length; it is the
  run's record (resume, export and PPO's policy_from read it), not a setting to refuse."""
  cfg = load_config(path)
  out = str(tmp_path / "config.yaml")
  dump_config(cfg, out)
  assert load_config(out) == cfg
  with pytest.raises(ConfigError, match="train.steps=7 .*would be ignored"):
    load_config(out, ["train.steps=7"])
