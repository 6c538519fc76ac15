"""The run configuration: one typed schema (a section per concern) and its YAML loader.

A leaf package: it imports nothing else of stepaudio_jax, and everything else imports its
sections from here.
"""

from stepaudio_jax.config.loading import ConfigError, dump_config, load_config
from stepaudio_jax.config.run import TASK_REGISTRY, RunConfig

__all__ = ["TASK_REGISTRY", "ConfigError", "RunConfig", "dump_config", "load_config"]
