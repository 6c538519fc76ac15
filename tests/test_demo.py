"""`make demo-fast` (the demo's one-minute form): runs as a subprocess the way the Makefile
starts it, prints the summary table and report paths, and no error-level log line."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

ERROR_LINE = re.compile(r"^(E\d{4} |ERROR|Traceback|.*\bF\d{4} )", re.M)


@pytest.mark.slow
def test_demo_fast_summary_and_quiet_log(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "stepaudio_jax.experiments.demo", "--fast",
                        "--out", str(tmp_path / "demo")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-3000:]
  assert not ERROR_LINE.search(log), ERROR_LINE.search(log).group(0)
  assert "| phase | steps | time | final metrics |" in out.stdout
  assert re.search(r"\| pretrain \(synthetic\) \| 300 \| \d+ s \| train/loss [\d.]+, eval/loss", out.stdout)
  report = tmp_path / "demo" / "report"
  assert (report / "report.md").exists() and (report / "perplexity.png").exists()
