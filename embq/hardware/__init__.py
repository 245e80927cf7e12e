"""Hardware targets and the plan search (`embq plan`, `embq hardware`).

Modules, one job each: `spec` (what a target serves: formats, kernels, row and table padding,
memory tiers, cost coefficients; YAML in `specs/`), `accounting` (a table's bytes under a format
and kernel on a target), `cost` (the latency model), `probe` (measures this machine and writes a
spec), `timing`, `encodings` (a model's tables in candidate formats, fitted once),
`sensitivity` (each table's log-loss increase per format, one table at a time, and a Fisher
proxy), `top` (the DLRM above the embeddings, re-run incrementally), `dense` (dense layers as
plan items), `search` (the exact multiple-choice knapsack as an integer program, and HAGO's
greedy baseline), `planner` (sensitivity -> search -> quantize -> measure on held-out rows),
`sweep` (a Pareto sweep over budgets and its comparisons).
"""
