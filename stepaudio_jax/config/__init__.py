"""The run configuration: typed sections and their YAML loader.

A leaf package: it imports nothing else of stepaudio_jax, and everything else imports its
sections from here. Tasks add their own sections (tasks/registry.py loads a run's config).
"""

from stepaudio_jax.config.loading import ConfigError, dump_config
from stepaudio_jax.config.run import RunConfig

__all__ = ["ConfigError", "RunConfig", "dump_config"]
