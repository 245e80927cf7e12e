"""Reports: the bootstrap intervals cover at their stated rate, the report's numbers are the
library's own evaluation, and the HTML is one self-contained, well-formed page whose plots all
have a title and axis labels."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import embq
from embq.reports import plots
from embq.reports.bootstrap import paired_auc_delta, paired_logloss_delta, row_logloss
from tests.test_torchrec import make_trained_dlrm

# ------------------------------------------------------------------ bootstrap


def _population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a fixed click model: labels, a calibrated model's scores and a noisier model's."""
    z = rng.normal(0.0, 1.2, n)
    p = 1 / (1 + np.exp(-(z - 1.0)))
    labels = (rng.random(n) < p).astype(np.float64)
    noisy = 1 / (1 + np.exp(-(z - 1.0 + rng.normal(0.0, 0.35, n))))
    return labels, p, noisy


def test_logloss_interval_covers_the_true_change_at_its_rate():
    rng = np.random.default_rng(0)
    labels, a, b = _population(rng, 2_000_000)
    truth = 100 * (row_logloss(labels, b).mean() / row_logloss(labels, a).mean() - 1)
    trials, hits = 200, 0
    for t in range(trials):
        idx = rng.integers(0, labels.size, 1500)
        d = paired_logloss_delta(labels[idx], a[idx], b[idx], resamples=300, seed=t)
        hits += d.low <= truth <= d.high
    # 95% nominal; 200 trials give a binomial sd of about 1.5 points
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_auc_interval_covers_the_true_change_at_its_rate():
    rng = np.random.default_rng(1)
    labels, a, b = _population(rng, 400_000)
    truth = roc_auc_score(labels, b) - roc_auc_score(labels, a)
    trials, hits = 80, 0
    for t in range(trials):
        idx = rng.integers(0, labels.size, 1500)
        d = paired_auc_delta(labels[idx], a[idx], b[idx], resamples=200, seed=t)
        assert d.delta == pytest.approx(roc_auc_score(labels[idx], b[idx])
                                        - roc_auc_score(labels[idx], a[idx]), abs=1e-12)  # fmt: skip
        hits += d.low <= truth <= d.high
    assert 0.85 <= hits / trials <= 1.0, hits / trials


def test_identical_models_have_a_zero_interval():
    rng = np.random.default_rng(2)
    labels, a, _ = _population(rng, 3000)
    d = paired_logloss_delta(labels, a, a.copy(), resamples=100)
    assert d.delta == 0 and d.low == 0 and d.high == 0


# ------------------------------------------------------------------ the report


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model_dir, data_dir = make_trained_dlrm(root, seed=4)
    model, _ = embq.load_model(model_dir)
    int4 = embq.save(embq.quantize(model, "int4", progress=False), root / "int4.embq")
    mixed = embq.save(embq.quantize(model, {"*": "int2-opt", "t_c0": "int8"}, progress=False),
                      root / "mixed.embq")  # fmt: skip
    out = root / "out"
    report = embq.report(model_dir, data_dir, [int4], plans=[mixed], output=out,
                         uniform_formats=("int8",), resamples=200, progress=False)  # fmt: skip
    return report, out, model_dir, data_dir, int4, mixed


def test_report_numbers_are_the_librarys_evaluation(report_dir):
    from embq.data.prepared import PreparedData
    from embq.models.metrics import evaluate

    report, _, model_dir, data_dir, int4, mixed = report_dir
    data = PreparedData(data_dir)
    _, (start, stop) = data.split(0.1)
    fp32 = evaluate(embq.load_model(model_dir)[0], data.batches(start, stop, 1024))
    for key in ("auc", "logloss", "ne", "calibration"):
        assert report["fp32"][key] == pytest.approx(fp32[key], rel=1e-12)
    for entry, path in zip(report["artifacts"], (int4, mixed)):
        got = evaluate(embq.load(path), data.batches(start, stop, 1024))
        for key in ("auc", "logloss", "ne", "calibration"):
            assert entry[key] == pytest.approx(got[key], rel=1e-12), (entry["name"], key)
        assert entry["logloss_delta_pct"] == pytest.approx(
            100 * (got["logloss"] / fp32["logloss"] - 1), rel=1e-9)
        lo, hi = entry["logloss_delta_ci95"]
        assert lo <= entry["logloss_delta_pct"] <= hi


def test_report_json_has_the_documented_keys(report_dir):
    _, out, *_ = report_dir
    report = json.loads((out / "report.json").read_text())
    assert {"tables", "artifacts", "fp32", "uniform", "plots"} <= set(report)
    names = {t["name"] for t in report["tables"]}
    assert names == {"t_c0", "t_c1", "t_c2", "t_c3"}
    for table in report["tables"]:
        assert {"name", "format", "bytes", "relative_mse", "lookup_share"} <= set(table)
    assert sum(t["lookup_share"] for t in report["tables"]) == pytest.approx(1.0)
    for artifact in report["artifacts"]:
        assert {"bytes_total", "size_ratio", "auc", "logloss", "logloss_delta_pct",
                "logloss_delta_ci95"} <= set(artifact)  # fmt: skip
    assert [a["kind"] for a in report["artifacts"]] == ["artifact", "plan"]
    mixed = report["artifacts"][1]
    assert {t["name"]: t["format"] for t in mixed["tables"]}["t_c0"] == "int8"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []
        self.svgs = 0
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.svgs += tag == "svg"
        self.scripts += tag == "script"
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]


def test_html_is_one_self_contained_page(report_dir):
    _, out, *_ = report_dir
    text = (out / "report.html").read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert page.tags[0] == "html" and "table" in page.tags
    assert page.svgs >= 4 and text.count("<svg") >= 4
    assert page.scripts == 0
    assert not [link for link in page.links if re.match(r"https?://", link)]
    assert (out / "report.md").read_text().startswith("# embq report")


def test_every_plot_has_a_title_and_axis_labels(monkeypatch, report_dir):
    """Each plot function is drawn again with the figure captured before it becomes SVG."""
    report, *_ = report_dir
    figures = []
    real = plots._svg
    monkeypatch.setattr(plots, "_svg", lambda fig: (figures.append(fig), real(fig))[1])
    first = report["artifacts"][0]
    rng = np.random.default_rng(0)
    labels = (rng.random(500) < 0.3).astype(float)
    p = rng.random(500)
    points = [{"name": "a", "size_ratio": 0.2, "logloss_delta_pct": 0.1, "kind": "plan"},
              {"name": "b", "size_ratio": 0.3, "logloss_delta_pct": 0.0, "kind": "uniform"}]  # fmt: skip
    plots.pareto_plot(points)
    plots.table_bytes_plot(first["tables"], "t")
    plots.bytes_by_format_plot(report["artifacts"])
    plots.error_vs_share_plot(first["tables"], "e")
    plots.reliability_plot(labels, {"fp32": p, "q": np.clip(p + 0.01, 0, 1)})
    plots.score_shift_plot(p, {"q": np.clip(p + 0.01, 0, 1)})
    assert len(figures) == 6
    for fig in figures:
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), fig


def test_compare_two_artifacts(report_dir, tmp_path):
    _, _, model_dir, data_dir, int4, mixed = report_dir
    result = embq.compare(int4, mixed, data_dir, model_dir=model_dir, output=tmp_path,
                          resamples=200)  # fmt: skip
    assert (tmp_path / "compare.html").exists()
    by_name = {t["name"]: t for t in result["tables"]}
    bytes_a = sum(t["bytes_a"] for t in by_name.values())
    bytes_b = sum(t["bytes_b"] for t in by_name.values())
    assert result["b_vs_a"]["bytes_ratio"] == pytest.approx(bytes_b / bytes_a)
    assert by_name["t_c0"]["closer_to_fp32"] == "b"  # int8 beats int4 on every row
    assert by_name["t_c1"]["smaller"] == "b" and by_name["t_c1"]["closer_to_fp32"] == "a"


def test_pareto_front_keeps_only_undominated_points():
    pts = [{"size_ratio": s, "logloss_delta_pct": d} for s, d in
           [(0.1, 1.0), (0.2, 0.5), (0.25, 0.7), (0.3, 0.1), (0.5, 0.1)]]  # fmt: skip
    front = plots.pareto_front(pts)
    assert [(p["size_ratio"], p["logloss_delta_pct"]) for p in front] == [(0.1, 1.0), (0.2, 0.5),
                                                                          (0.3, 0.1)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_report_renders_in_a_real_browser(report_dir, tmp_path):
    """Headless Chromium renders the page to a screenshot that is not blank."""
    from scripts.screenshot_report import screenshot

    _, out, *_ = report_dir
    png = screenshot(out / "report.html", tmp_path / "shot.png")
    assert png.stat().st_size > 20_000
