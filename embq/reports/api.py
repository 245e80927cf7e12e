"""`embq.report` and `embq.compare`: build a report and write it, in one call."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from embq.reports.build import build_report, compare_artifacts
from embq.reports.render import write_report


def report(
    model: str | os.PathLike,
    data: str | os.PathLike,
    artifacts: Iterable[str | os.PathLike] = (),
    *,
    plans: Iterable[str | os.PathLike] = (),
    output: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A size / quality report: fp32 (`model`, an `embq train` directory) against each artifact
    on the held-out rows of the prepared dataset `data`, with paired bootstrap intervals,
    per-table and per-layer errors and plots. With `output`, writes report.json, report.md and
    report.html there. `options` go to `embq.reports.build.build_report` (sensitivity,
    uniform_formats, kernel, resamples, progress, ...).

    Returns:
        The report (the content of report.json; keys documented in docs/report.md).
    """
    result, figures = build_report(model, data, list(artifacts), plans=list(plans), **options)
    if output is not None:
        write_report(result, figures, output)
    return result


def compare(
    a: str | os.PathLike, b: str | os.PathLike, data: str | os.PathLike, *,
    output: str | os.PathLike | None = None, **options: Any,
) -> dict[str, Any]:  # fmt: skip
    """Two artifacts side by side on the held-out rows of `data`: B's change over A with paired
    bootstrap intervals, and per table which one is smaller and which closer to fp32 (pass
    `model_dir=` for errors on the looked-up rows). With `output`, writes compare.json / .md /
    .html there."""
    result, figures = compare_artifacts(a, b, data, **options)
    if output is not None:
        write_report(result, figures, output, stem="compare")
    return result
