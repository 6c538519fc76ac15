"""seqio interop: a registered seqio Task (TextLine source, the corpus' sentencepiece vocabulary)
read as the text component, through templating and packing, with the ids it should have."""

import os

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from stepaudio_jax.config.data import DataConfig, StageConfig  # noqa: E402
from stepaudio_jax.config.model import TokenLayout, VisionConfig  # noqa: E402
from stepaudio_jax.data.loader import GrainLoader  # noqa: E402
from stepaudio_jax.data.seqio_source import SeqioTextSource, seqio_examples  # noqa: E402
from stepaudio_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer  # noqa: E402

SPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "data_pipelines", "corpus", "spm_unigram.model")
LAYOUT = TokenLayout(text_vocab_size=1024, linguistic_codes=64, semantic_codes=96)
LINES = ["three plus four is seven.", "the kite is red.", "who owns the ball?",
         "Tom owns the ball.", "twelve minus five is seven."]
TASK = "stepaudio_test_lines"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  path = tmp_path_factory.mktemp("seqio") / "lines.txt"
  path.write_text("".join(line + "\n" for line in LINES))
  vocab = seqio.SentencePieceVocabulary(SPM)
  seqio.TaskRegistry.add(
      TASK,
      source=seqio.TextLineDataSource({"train": str(path)}),
      preprocessors=[lambda ds: ds.map(lambda line: {"targets": line}),
                     seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(vocab, add_eos=True)})
  yield TASK
  seqio.TaskRegistry.remove(TASK)


def test_task_ids_and_retokenized_ids(task):
  spm = SentencePieceTokenizer(SPM, LAYOUT)
  want = [spm.encode(line) for line in LINES]
  kept = [ex.text[0].tolist() for ex in seqio_examples(task, "train", "targets", "task", spm)]
  assert kept == want  # the Task's EOS (id 3) is dropped: the template adds ours
  byte = ByteTokenizer(LAYOUT)  # another vocabulary: decoded with the Task's, encoded with ours
  again = [ex.text[0].tolist() for ex in seqio_examples(task, "train", "targets", "retokenize",
                                                        byte)]
  assert again == [byte.encode(line) for line in LINES]
  source = SeqioTextSource(task, "train", "targets", "task", spm)
  assert len(source) == len(LINES) and source[1][0] == f"seqio task {task} split train example 1"
  with pytest.raises(ValueError, match="no output feature 'inputs'"):
    SeqioTextSource(task, "train", "inputs", "task", spm)


def test_loader_packs_the_task_as_the_text_component(task):
  data = DataConfig(source="grain", tokenizer_model=SPM, seqio_task=task, seqio_ids="task",
                    stages=[StageConfig(audio=0, text=1, image=0)])
  loader = GrainLoader(data, LAYOUT, VisionConfig(), 64, 2, seed=0)
  spm = SentencePieceTokenizer(SPM, LAYOUT)
  want = {tuple([LAYOUT.bos_id] + spm.encode(line) + [LAYOUT.eos_id]) for line in LINES}
  seen = set()
  for _ in range(3):
    batch = loader.next_local()
    for row in range(batch["tokens"].shape[0]):
      seg_ids = batch["segment_ids"][row]
      for s in np.unique(seg_ids[seg_ids > 0]):
        at = seg_ids == s
        doc = tuple(batch["tokens"][row][at].tolist() + [batch["targets"][row][at][-1]])
        assert doc in want and batch["loss_mask"][row][at].all()
        seen.add(doc)
  assert seen == want
  assert loader.stats()["tokens/text"] > 0
  with pytest.raises(ValueError, match="replaces data.shards.text"):
    DataConfig(source="grain", seqio_task=task, shards={"text": ["x"]})
