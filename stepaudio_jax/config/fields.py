"""Helpers the section dataclasses share."""

import dataclasses
import enum


def coerce_enums(section) -> None:
  """Turn the strings a section was built with (from Python, not YAML) into its enum members,
  so `Section(codebooks="semantic")` and the loaded config compare equal."""
  for f in dataclasses.fields(section):
    if isinstance(f.type, type) and issubclass(f.type, enum.Enum):
      object.__setattr__(section, f.name, f.type(getattr(section, f.name)))
