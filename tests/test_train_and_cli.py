"""Training, saving without pickle, and the CLI, on small data."""

import json
import zipfile

import numpy as np
import pytest

from embq.cli import main
from embq.data.prepared import PreparedData
from embq.errors import ConfigError
from embq.models.dlrm import load_model, save_model
from embq.models.metrics import click_metrics, evaluate
from embq.models.train import TrainSettings, train_dlrm


def test_click_metrics_against_hand_values():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.4, 0.35, 0.8])
    m = click_metrics(labels, probs)
    assert m["auc"] == pytest.approx(0.75)
    ll = -np.mean(np.log([0.9, 0.6, 0.35, 0.8]))
    assert m["logloss"] == pytest.approx(ll)
    assert m["ne"] == pytest.approx(ll / np.log(2))
    assert m["calibration"] == pytest.approx(probs.mean() / 0.5)


def test_train_learns_and_round_trips(synth_prepared, tmp_path):
    data = PreparedData(synth_prepared)
    model, config, metrics = train_dlrm(data, TrainSettings(epochs=1, batch_size=512), progress=False)
    assert metrics["auc"] > 0.72, metrics
    save_model(model, config, tmp_path / "m")
    assert not zipfile.is_zipfile(tmp_path / "m" / "model.safetensors")  # not a torch pickle
    loaded, loaded_config = load_model(tmp_path / "m")
    assert loaded_config == config
    _, (s, e) = data.split(0.1)
    again = evaluate(loaded, data.batches(s, e, 4096))
    assert again["logloss"] == pytest.approx(metrics["logloss"], rel=1e-6)
    with pytest.raises(ConfigError, match="already exists"):
        save_model(model, config, tmp_path / "m")


def test_cli_end_to_end(tmp_path, capsys):
    raw, prepared, model = tmp_path / "raw.tsv", tmp_path / "prep", tmp_path / "model"
    assert main(["data", "synth", "--rows", "30000", "--seed", "1", "--output", str(raw), "--quiet"]) == 0
    assert main(["data", "prepare", "--input", str(raw), "--output", str(prepared),
                 "--table-size", "5000", "--quiet"]) == 0
    summary = json.loads((prepared / "summary.json").read_text())
    for key in ("rows_read", "rows_refused", "cardinalities", "missing_rates"):
        assert key in summary
    assert main(["train", "--data", str(prepared), "--output", str(model), "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"auc", "logloss", "ne"} <= out.keys()
    assert main(["evaluate", "--model", str(model), "--data", str(prepared)]) == 0
    # Errors are one clear line and exit code 2, not a traceback.
    assert main(["train", "--data", str(prepared), "--output", str(model), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
