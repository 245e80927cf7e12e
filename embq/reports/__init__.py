"""Size / quality reports a person reads and plots.

`build` measures fp32 against artifacts on held-out rows (bytes, AUC, log loss, NE, calibration,
paired bootstrap intervals, per-table and per-layer errors); `render` writes report.json,
report.md and report.html (self-contained, plots inline as SVG); `plots` draws them;
`bootstrap` the intervals; `measure` the predictions and errors; `quality` the table of uniform
formats the demo prints. `embq.report(...)` and `embq report` are the ways in.
"""
