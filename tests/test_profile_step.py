"""benchmarks/profile_step.py: the wall-time split of a trace (hand-computed), the HLO parser
on a compiled program, and an end-to-end profile of the tiny config."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import profile_step


def test_wall_time_is_shared_by_concurrent_events_and_gaps_go_to_awaited_dots():
  # Thread 1: X runs 0-10 with Y nested in it at 2-4. Thread 2: Z runs 5-15. Nothing is traced
  # 15-20 (an asynchronous dot D finishing), then W, which reads D, runs 20-22.
  threads = [[(0, 10, "X"), (2, 2, "Y"), (20, 2, "W")], [(5, 10, "Z")]]
  instructions = {"X": {"operands": []}, "Y": {"operands": []}, "Z": {"operands": []},
                  "W": {"operands": ["D", "X"]}, "D": {"matmul": True, "operands": []}}
  got = profile_step.wall_times(threads, instructions)
  # X alone 0-2 and 4-5, Y alone 2-4, X and Z share 5-10, Z alone 10-15, D gets 15-20.
  want = {"X": 2 + 1 + 2.5, "Y": 2, "Z": 2.5 + 5, "D": 5, "W": 2}
  assert got == pytest.approx({k: v * 1e-9 for k, v in want.items()})
  assert sum(got.values()) == pytest.approx(22e-9)


def test_a_gap_before_an_instruction_that_awaits_no_matmul_is_untraced():
  instructions = {"A": {"operands": []}, "B": {"operands": ["A"]}}
  got = profile_step.wall_times([[(0, 3, "A"), (7, 1, "B")]], instructions)
  assert got == pytest.approx({"A": 3e-9, profile_step.UNTRACED: 4e-9, "B": 1e-9})


def test_hlo_parser_finds_scopes_functions_operands_and_matmul_fusions():
  def mlp(x, w):
    with jax.named_scope("mlp"):
      return jax.nn.silu(x @ w).sum()

  x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
  compiled = jax.jit(jax.grad(mlp, argnums=1)).lower(x, w).compile()
  instructions = profile_step.hlo_instructions(compiled.as_text())
  matmuls = [i for i in instructions.values() if i["matmul"]]
  assert len(matmuls) >= 2, instructions  # the forward product and the weight gradient
  for info in matmuls:
    assert "mlp" in info["scopes"], info
    assert info["function"].endswith(".mlp") and info["file"] == __file__, info
    assert profile_step.jax_part(info["scopes"], info["function"]) == "mlp"
  consumers = [i for i in instructions.values() if set(i["operands"]) & set(instructions)]
  assert consumers  # operand names resolve to instructions


def test_profile_of_the_tiny_step_accounts_for_its_wall_time():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "configs/tiny.yaml",
       "train.batch_size=2", "train.seq_len=64", "vision.enabled=false", "--steps", "2",
       "--no-torch"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  parts = r["jax"]["parts"]
  for part in ("attention core", "q/k/v/o projections", "mlp", "lm head + loss"):
    assert parts[part]["matmul"] > 0, (part, parts)
  assert parts["norms"]["rest"] > 0 and parts["optimizer + clipping"]["rest"] > 0, parts
  traced = sum(p["matmul"] + p["rest"] for p in parts.values())
  assert 0.5 * r["jax"]["wall"] < traced < 1.5 * r["jax"]["wall"], (traced, r["jax"]["wall"])
  assert r["torch_skipped"] == "--no-torch"
