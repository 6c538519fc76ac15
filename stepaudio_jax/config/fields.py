"""Helpers the section dataclasses share."""

import dataclasses
import enum
from typing import Any

INPUT_PATH = "input_path"


def input_path(**field_args: Any) -> Any:
  """A field holding input paths (a path, a list of globs, or a mapping of them): a config file
  that sets it gives them relative to itself, as `base:` is (config/loading.py resolves them)."""
  return dataclasses.field(metadata={INPUT_PATH: True}, **field_args)


def coerce_enums(section) -> None:
  """Turn the strings a section was built with (from Python, not YAML) into its enum members,
  so `Section(codebooks="semantic")` and the loaded config compare equal."""
  for f in dataclasses.fields(section):
    if isinstance(f.type, type) and issubclass(f.type, enum.Enum):
      object.__setattr__(section, f.name, f.type(getattr(section, f.name)))
