"""What TensorBoard shows of a run: a Custom Scalars layout (model vs GD vs PGD on one chart, every
loop on one chart), an HParams record comparing runs, and non-finite values as counts."""
import numpy as np
import pytest

from loopicl import registry, runlog, train
from tests.test_train import tiny_config


def _accumulator(path):
  # The plugin accumulator is what TensorBoard's server reads (it migrates hparams summaries).
  from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
  acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  return acc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tb")
  result = train.train_and_evaluate(tiny_config(), str(workdir), log=lambda *a: None, progress=False)
  return workdir, result


def test_layout_puts_model_gd_and_pgd_on_one_chart(run_dir):
  from tensorboard.plugins.custom_scalar import layout_pb2
  workdir, result = run_dir
  acc = _accumulator(workdir)
  assert "custom_scalars__config__" in acc.Tags()["tensors"]
  proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
  layout = layout_pb2.Layout.FromString(proto.string_val[0])
  charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
  errors = [tags for title, tags in charts.items() if "model, GD" in title]
  assert errors == [["eval/test_error", "eval/gd_error", "eval/pgd_error"]]
  assert ["eval/per_loop/test_error_loop_.*"] in charts.values()
  # Every tag a chart names is logged (regexes match at least one scalar tag).
  import re
  scalars = acc.Tags()["tensors"]  # the plugin accumulator keeps scalars as tensors
  for tags in charts.values():
    for tag in tags:
      assert any(re.fullmatch(tag, s) for s in scalars), tag
  # PGD is reported at the trained T, and the ratio is consistent.
  assert result["pgd_ratio"] == pytest.approx(result["test_error"] / result["pgd_error"])


def test_hparams_record_holds_the_config_and_the_metrics(run_dir):
  from tensorboard.plugins.hparams import plugin_data_pb2
  workdir, _ = run_dir
  acc = _accumulator(workdir)
  tags = acc.PluginTagToContent("hparams")
  assert set(tags) == {"_hparams_/experiment", "_hparams_/session_start_info"}
  meta = acc.SummaryMetadata("_hparams_/session_start_info")
  start = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content).session_start_info
  assert start.hparams["model.loops"].number_value == 2
  assert start.hparams["task.kind"].string_value == "linear_regression"
  meta = acc.SummaryMetadata("_hparams_/experiment")
  experiment = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content).experiment
  metrics = {m.name.tag for m in experiment.metric_infos}
  assert metrics == set(registry.get("linear_regression").hparam_metrics)


def test_nonfinite_scalars_are_counted_not_written(tmp_path):
  log = runlog.RunLog(str(tmp_path))
  log.scalars(3, {"a": float("nan"), "b": np.float32(np.inf), "c": 1.5}, prefix="eval/")
  log.close()
  acc = _accumulator(tmp_path)
  assert set(acc.Tags()["tensors"]) == {"eval/c", "eval/nonfinite/a", "eval/nonfinite/b"}
  assert [float(e.tensor_proto.float_val[0]) for e in acc.Tensors("eval/nonfinite/a")] == [1.0]
