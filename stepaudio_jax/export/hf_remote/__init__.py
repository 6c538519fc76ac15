"""Remote code for an exported Step1 (sqrt-ALiBi) directory, so that transformers'
`AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` loads it as it loads the
public Step-Audio checkpoints (config.json's auto_map names these modules).

The modules import only torch and transformers, since they are copied next to the weights and
run without this package; the rope variant exports as plain `llama` and needs none of them.
"""

import json
import os
import shutil

FILES = ("configuration_step1.py", "modeling_step1.py")  # every module shipped here


def copy_remote_code(out_dir: str) -> None:
  """Copy into out_dir the modules its config.json's auto_map names (none without one)."""
  with open(os.path.join(out_dir, "config.json")) as f:
    auto_map = json.load(f).get("auto_map", {})
  here = os.path.dirname(os.path.abspath(__file__))
  for name in sorted({ref.split(".")[0] + ".py" for ref in auto_map.values()}):
    if name not in FILES:
      raise ValueError(f"{out_dir}/config.json: auto_map names {name}, which "
                       f"stepaudio_jax.export.hf_remote does not ship (it has {FILES})")
    shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))
