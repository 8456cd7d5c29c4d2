"""Where a stage's scalars go: `report_to` as one name or a list; TensorBoard, and trackio written locally."""

import importlib.util
import json
import sqlite3

import pytest

from alignment.config import ConfigError
from alignment.recipe import recipe_from_dict
from alignment.stages.trackers import log_eval_scalars, open_trackers


def test_report_to_takes_one_name_or_a_list():
    assert recipe_from_dict({"report_to": "tensorboard", "stages": [{"type": "sft"}]}).report_to == ["tensorboard"]
    assert recipe_from_dict({"report_to": "none", "stages": [{"type": "sft"}]}).report_to == ["none"]
    assert recipe_from_dict({"report_to": ["tensorboard", "trackio"], "stages": [{"type": "sft"}]}).report_to == [
        "tensorboard", "trackio"]
    with pytest.raises(ConfigError, match=r"report_to: values must be in \('tensorboard', 'wandb', 'trackio', 'none'\)"):
        recipe_from_dict({"report_to": "mlflow", "stages": [{"type": "sft"}]})


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed")
def test_trackio_logs_training_and_evaluation_scalars_locally(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    writer = open_trackers(tmp_path / "runs" / "sft", ("trackio",), "covers")
    writer.add_scalar("sft/loss", 1.5, 3)
    log_eval_scalars(writer, "sft", 3, {"exact_match": 0.75, "samples": []}, None)
    writer.close()
    out = capsys.readouterr().out
    assert out.splitlines() == ["[sft] trackio: project 'vlm-align', run covers/sft (see it with "
                                "`trackio show --project vlm-align`)"], out
    rows = sqlite3.connect(tmp_path / "trackio" / "vlm-align.db").execute(
        "select run_name, step, metrics from metrics order by id").fetchall()
    logged = {key: (run, step, value) for run, step, blob in rows for key, value in json.loads(blob).items()}
    assert logged == {"sft/loss": ("covers/sft", 3, 1.5), "sft/eval/exact_match": ("covers/sft", 3, 0.75)}
