"""Imports go one way: config <- (parallel <- kernels, audio) <- models <- (inference, data) <-
tasks <- training <- export <- experiments <- cli.

Read from the source (every import statement, also inside functions), so a lazy upward import
fails here too.
"""

import ast
import os

import pytest

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "stepaudio_jax")
# package -> the stepaudio_jax packages it must not import
FORBIDDEN = {
    "config": ("parallel", "kernels", "audio", "models", "inference", "data", "tasks",
               "training", "export", "experiments", "cli", "launch"),
    "parallel": ("kernels", "audio", "models", "inference", "data", "tasks", "training",
                 "export", "experiments", "cli"),
    "kernels": ("audio", "models", "inference", "data", "tasks", "training", "export",
                "experiments", "cli"),
    "audio": ("parallel", "kernels", "models", "inference", "data", "tasks", "training",
              "export", "experiments", "cli"),
    "models": ("inference", "data", "tasks", "training", "export", "experiments", "cli"),
    "inference": ("data", "tasks", "training", "export", "experiments", "cli"),
    "data": ("inference", "tasks", "training", "export", "experiments", "cli"),
    "tasks": ("training", "export", "experiments", "cli"),
    "training": ("export", "experiments", "cli"),
    "export": ("experiments", "cli"),
    "experiments": ("cli",),
}


def _imports(path: str) -> set[str]:
  """The first package under stepaudio_jax of every import in the file."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] == "stepaudio_jax" and len(parts) > 1:
        out.add(parts[1])
  return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
  bad = []
  for root, _, files in os.walk(os.path.join(PACKAGE, package)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        for target in _imports(path) & set(FORBIDDEN[package]):
          bad.append(f"{os.path.relpath(path, REPO)} imports stepaudio_jax.{target}")
  assert not bad, "\n".join(bad)
