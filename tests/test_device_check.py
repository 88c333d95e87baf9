"""scripts/device_check.sh runs end to end in its reduced CPU form (the full form needs a GPU)."""
import os
import re
import subprocess

import pytest

from tests.test_train import ROOT


@pytest.mark.slow  # ~45 s, the default suite's heaviest test (532-636 s idle this session; budget 600)
def test_device_check_reduced_form_runs_and_summarizes(tmp_path):
  out = tmp_path / "check"
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--cpu",
                         "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
  summary = (out / "device_check.md").read_text()
  assert proc.returncode == 0, summary + proc.stderr[-2000:]
  assert "## Tests\npassed:" in summary
  rows = re.findall(r"^\| (\d+) \| (\w+) \| ([0-9.]+) \|", summary, flags=re.M)
  assert [r[0] for r in rows] == ["256"] and all(float(r[2]) > 0 for r in rows)
  assert "identical" in summary and "resumed from a checkpoint" in summary
  assert summary.rstrip().endswith("result: all steps passed")


def test_device_check_refuses_unknown_arguments():
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--gpu"],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert proc.returncode == 2 and proc.stderr.startswith("error: unknown argument --gpu")
