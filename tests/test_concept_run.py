"""Concept classification through the shared training loop, evaluate and its report."""
import json
import math
import os

import numpy as np
import pytest

from loopicl import config as config_lib, run, train
from loopicl.concepts import report as concept_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _concepts_config(**overrides):
  c = config_lib.load_file(os.path.join(ROOT, "configs", "concepts.py"))
  for k, v in overrides.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


@pytest.fixture(scope="module")
def concept_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("concepts")
  config = _concepts_config(**{"train.steps": 300, "eval.every": 50, "eval.num_prompts": 512,
                               "checkpoint.every": 300, "train.warmup_steps": 20})
  result = train.train_and_evaluate(config, str(workdir), log=lambda *a: None, progress=False)
  return workdir, result


def test_training_beats_chance_in_and_out_of_distribution(concept_run):
  _, result = concept_run
  assert result["step"] == 300
  assert result["test_zero_one"] < 0.1  # chance is 0.5
  assert result["ood"]["switched"]["zero_one"] < 0.2  # the labels are read, not memorised
  records = [json.loads(l) for l in open(concept_run[0] / "metrics.jsonl")]
  assert [r["step"] for r in records] == list(range(50, 301, 50))
  assert records[-1]["test_cross_entropy"] < records[0]["test_cross_entropy"]


def test_evaluate_writes_the_contract_and_figures_match_it(concept_run):
  workdir, _ = concept_run
  report = run.evaluate_run(str(workdir), num_prompts=512, log=lambda *a: None)
  on_disk = json.load(open(workdir / "eval" / "report.json"))
  for key in ("test_zero_one", "test_cross_entropy", "correct_attention"):
    assert math.isclose(on_disk[key], report[key])
  assert set(on_disk["ood"]) == {"length", "skewed", "switched", "unseen"}
  for v in on_disk["ood"].values():
    assert 0 <= v["zero_one"] <= 1 and v["cross_entropy"] >= 0
  for name in ("zero_one", "correct_attention", "alignment"):
    assert (workdir / "eval" / f"{name}.png").exists()
  figs = concept_report.figures(on_disk)
  line = [l for l in figs["correct_attention"].axes[0].lines if l.get_gid() == "correct_attention"][0]
  assert list(line.get_ydata()) == on_disk["curves"]["correct_attention"]
  assert list(line.get_xdata()) == on_disk["curves"]["step"]


def test_geometric_rate_recovers_a_known_rate():
  steps = np.arange(0, 1000, 100)
  fit = concept_report.geometric_rate(steps, 0.4 * 0.5 ** (steps / 100.0))
  assert fit["rate_per_1000_steps"] == pytest.approx(0.5 ** 10, rel=1e-6)
  # Points after the loss first reaches 0 are not used (log 0), nor are NaNs.
  fit = concept_report.geometric_rate([0, 100, 200, 300], [0.1, 0.01, 0.0, 0.5])
  assert fit["points"] == 2 and fit["rate_per_step"] == pytest.approx(0.1 ** (1 / 100), rel=1e-9)
  # With a floor, the fit stops where the loss first falls to it.
  fit = concept_report.geometric_rate([0, 100, 200, 300], [0.1, 0.01, 0.001, 0.0005], floor=0.001)
  assert fit["points"] == 2
