"""A Pareto sweep over byte budgets: the exact plan and HAGO's greedy plan at each budget, the
uniform formats beside them, all measured on the held-out rows, and the comparisons that say
whether the search earns its keep (`summary`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embq.hardware.planner import Planned, Planner
from embq.hardware.search import InfeasibleError

DOMINANCE_TOLERANCE_PP = 0.01  # percentage points of log loss a plan may lose to a uniform format


@dataclass
class Sweep:
    """Plans of a sweep: `exact[b]`, `greedy[b]` per budget (None where infeasible), uniform
    formats, the search's seconds, and what could not be planned."""

    budgets: list[float]
    exact: dict[float, Planned | None] = field(default_factory=dict)
    greedy: dict[float, Planned | None] = field(default_factory=dict)
    uniform: list[Planned] = field(default_factory=list)
    search_seconds: list[float] = field(default_factory=list)
    infeasible: dict[str, str] = field(default_factory=dict)

    def plans(self) -> list[Planned]:
        found = [p for d in (self.exact, self.greedy) for p in d.values() if p is not None]
        return found + self.uniform


def run_sweep(planner: Planner, budgets: list[float], *, greedy: bool = True,
              uniform: bool = True, max_seconds: float | None = None) -> Sweep:  # fmt: skip
    """Plan every budget with the exact search (and HAGO's greedy one), add the uniform
    formats; nothing is measured yet (`measure`)."""
    sweep = Sweep(list(budgets))
    planner.sensitivity()
    for b in budgets:
        for solver, into in (("exact", sweep.exact), ("greedy", sweep.greedy)):
            if solver == "greedy" and not greedy:
                continue
            began = time.perf_counter()
            try:
                into[b] = planner.plan(b, solver, max_seconds)
            except InfeasibleError as e:
                into[b] = None
                sweep.infeasible[f"{solver}@{b:g}"] = str(e)
            if solver == "exact":
                sweep.search_seconds.append(time.perf_counter() - began)
    if uniform:
        sweep.uniform = [u for u in (planner.uniform(f) for f in planner.formats) if u is not None]
    return sweep


def measure(planner: Planner, sweep: Sweep, latency: bool = True, rounds: int = 5) -> None:
    """Held-out log loss of every plan; lookup latency of every plan the runtime serves."""
    planner.measure_loss(sweep.plans())
    if latency:
        planner.measure_latency(sweep.plans(), rounds=rounds)


def dominance(sweep: Sweep) -> dict[str, Any]:
    """At every budget: the exact plan's measured loss against the best uniform format that
    fits the budget (within DOMINANCE_TOLERANCE_PP percentage points)."""
    checks = []
    for b, plan in sweep.exact.items():
        if plan is None or "loss_pct" not in plan.measured:
            continue
        fitting = [u for u in sweep.uniform
                   if u.predicted["bytes_ratio"] <= b + 1e-12 and "loss_pct" in u.measured]  # fmt: skip
        if not fitting:
            continue
        best = min(fitting, key=lambda u: u.measured["loss_pct"])
        checks.append({"budget": b, "plan_pct": plan.measured["loss_pct"], "uniform": best.name,
                       "uniform_pct": best.measured["loss_pct"],
                       "ok": plan.measured["loss_pct"] <= best.measured["loss_pct"]
                       + DOMINANCE_TOLERANCE_PP})  # fmt: skip
    return {"ok": all(c["ok"] for c in checks) if checks else None, "checks": checks}


def exact_le_greedy(sweep: Sweep) -> dict[str, Any]:
    """At every budget both solvers planned: the exact search's predicted objective against
    HAGO-greedy's (from the two solutions, not assumed)."""
    pairs = []
    for b in sweep.budgets:
        e, g = sweep.exact.get(b), sweep.greedy.get(b)
        if e is None or g is None:
            continue
        pairs.append({"budget": b, "exact": e.solution.loss, "greedy": g.solution.loss,
                      "ok": e.solution.loss <= g.solution.loss + 1e-15})  # fmt: skip
    return {"ok": all(p["ok"] for p in pairs) if pairs else None, "pairs": pairs}


def latency_error(plans: list[Planned]) -> float | None:
    """Median |predicted - measured| / measured lookup seconds over plans measured."""
    errors = [p.measured["latency_rel_error"] for p in plans if "latency_rel_error" in p.measured]
    return float(np.median(errors)) if errors else None


def markdown(planner: Planner, sweep: Sweep) -> str:
    """The sweep as a Markdown table: one line per plan, predicted and measured."""
    head = ("| plan | bytes vs fp32 | predicted log loss (calibration rows) | measured log loss "
            "(held-out) | predicted lookup ms | measured lookup ms (CPU clock) | choices |")  # fmt: skip
    lines = [head, "|" + "---|" * 7]

    def ms(p: Planned, key: str, src: dict) -> str:
        return f"{src[key] * 1e3:.3f}" if key in src else "—"

    for p in sweep.plans():
        bytes_ratio = p.measured.get("bytes_ratio", p.predicted["bytes_ratio"])
        measured = f"{p.measured['loss_pct']:+.3f}%" if "loss_pct" in p.measured else "—"
        choices = ", ".join(f"{re.sub(r'[(].*?[)]', '', k)} x{v}" for k, v in
                            sorted(p.row()["choices"].items(), key=lambda kv: -kv[1]))  # fmt: skip
        lines.append(f"| {p.name} | {bytes_ratio:.4f} | {p.predicted['loss_pct']:+.3f}% | "
                     f"{measured} | {ms(p, 'seconds', p.predicted)} | "
                     f"{ms(p, 'seconds', p.measured)} | {choices} |")  # fmt: skip
    return "\n".join(lines)
