"""Choosing one option per item (a table's format and kernel, a dense layer's kernel) that
minimises the predicted loss increase under a byte budget, memory-tier capacities and a latency
budget: a multiple-choice knapsack, solved exactly as an integer program (`scipy.optimize.milp`,
HiGHS), with HAGO's greedy search as the baseline it is compared with.

    minimise    sum_i sum_o loss[i,o] x[i,o]
    subject to  sum_o x[i,o] = 1                                   every item one option
                sum_(i budgeted) sum_o bytes[i,o] x[i,o] <= max_bytes
                sum_(o in tier t) tier_bytes[i,o] x[i,o] <= capacity[t]     every tier
                base + sum seconds[i,o] x[i,o] + sum_g (call[g] y[g] - alone[g] w[g]) <= max_seconds
                x[i,o] <= y[group(o)]         a call is paid once if any of its options is picked
                w[g] <= y[g],  G w[g] + sum_(h != g) y[h] <= G   `alone[g]` is saved when g is the
                                                                  only call (G: number of calls)
                x, y, w binary

Options another option of the same item beats or equals in loss, bytes and seconds, in the same
tier and call, are dropped first (`undominated`: the optimum cannot need them), so that a coarser
format with the same bytes as a finer one on a target is never picked. Among plans of equal
predicted loss (within LOSS_TOLERANCE) the faster one, then the smaller one, is returned (a
second solve). `hago_greedy` is HAGO's `GreedySearchTuner` (ZihengJiang/tvm-hago,
python/tvm/hago/search.py) on these predictions; `greedy_for_budget` adds what it needs to meet
a budget (see there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from embq.errors import ConfigError

# plans within LOSS_TOLERANCE x the largest option loss of the optimum count as equally good
# (tighter ties are below HiGHS' feasibility tolerance and make the second solve infeasible)
LOSS_TOLERANCE = 1e-6


class InfeasibleError(ConfigError):
    """No plan meets the constraints; `min_bytes` is the smallest byte budget that does (None
    when the tiers or the latency budget rule out every plan whatever the byte budget)."""

    def __init__(self, message: str, min_bytes: int | None) -> None:
        super().__init__(message)
        self.min_bytes = min_bytes


@dataclass(frozen=True)
class Option:
    """One choice for one item.

    Attributes:
        label: what it is, e.g. "int4-opt@compact".
        loss: predicted loss increase (the objective).
        bytes: bytes it takes (counted in the byte budget if its item is budgeted).
        tier: the memory tier those bytes live in (None: none).
        seconds: its own predicted latency (per batch).
        group: the call it joins (its overhead `Problem.group_seconds[group]` is paid once).
    """

    label: str
    loss: float
    bytes: int = 0
    tier: str | None = None
    seconds: float = 0.0
    group: str | None = None


@dataclass(frozen=True)
class Item:
    """A table or layer and its options; `budgeted`: its bytes count in the byte budget."""

    name: str
    options: tuple[Option, ...]
    budgeted: bool = True


@dataclass(frozen=True)
class Problem:
    """Items and constraints (None / missing: unconstrained). `group_alone` is the part of a
    call's overhead saved when it is the only call (the permute it then skips, and the reorder
    of the outputs, which `base_seconds` counts once for every plan)."""

    items: tuple[Item, ...]
    max_bytes: int | None = None
    capacities: dict[str, int] = field(default_factory=dict)
    max_seconds: float | None = None
    group_seconds: dict[str, float] = field(default_factory=dict)
    group_alone: dict[str, float] = field(default_factory=dict)
    base_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ConfigError(f"a byte budget is at least 0, got {self.max_bytes}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"a latency budget is positive, got {self.max_seconds} s")
        for item in self.items:
            if not item.options:
                raise ConfigError(f"{item.name} has no option the target can serve; add "
                                  "formats (or kernels) that fit it")  # fmt: skip


@dataclass(frozen=True)
class Solution:
    """An assignment and what it costs: `picks[i]` is the option index of item i."""

    picks: tuple[int, ...]
    loss: float
    bytes: int
    tier_bytes: dict[str, int]
    seconds: float
    solver: str

    def options(self, problem: Problem) -> list[Option]:
        return [item.options[k] for item, k in zip(problem.items, self.picks)]


def evaluate(problem: Problem, picks: Sequence[int], solver: str = "") -> Solution:
    """The exact loss, budgeted bytes, tier bytes and seconds of an assignment."""
    loss, nbytes, seconds = 0.0, 0, problem.base_seconds
    tiers: dict[str, int] = {}
    groups = set()
    for item, k in zip(problem.items, picks):
        o = item.options[k]
        loss += o.loss
        seconds += o.seconds
        if item.budgeted:
            nbytes += o.bytes
        if o.tier is not None:
            tiers[o.tier] = tiers.get(o.tier, 0) + o.bytes
        if o.group is not None:
            groups.add(o.group)
    seconds += sum(problem.group_seconds.get(g, 0.0) for g in groups)
    if len(groups) == 1:
        seconds -= problem.group_alone.get(next(iter(groups)), 0.0)
    return Solution(tuple(int(k) for k in picks), loss, nbytes, tiers, seconds, solver)


def feasible(problem: Problem, s: Solution, slack: float = 1e-9) -> bool:
    """Whether a solution meets every constraint (seconds within a relative `slack`)."""
    if problem.max_bytes is not None and s.bytes > problem.max_bytes:
        return False
    if any(s.tier_bytes.get(t, 0) > cap for t, cap in problem.capacities.items()):
        return False
    if problem.max_seconds is not None and s.seconds > problem.max_seconds * (1 + slack):
        return False
    return True


# --------------------------------------------------------------------------- exact


class _Model:
    """The integer program's matrices for one problem."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.index = []  # (item, option) of each x column
        for i, item in enumerate(problem.items):
            self.index.extend((i, k) for k in range(len(item.options)))
        groups = sorted({o.group for it in problem.items for o in it.options if o.group})
        self.groups = {g: n for n, g in enumerate(groups)}
        self.nx, self.ng = len(self.index), len(groups)
        self.n = self.nx + 2 * self.ng  # x, y, w
        self.rows: list[tuple[np.ndarray, float, float]] = []
        for i in range(len(problem.items)):  # one option per item
            self.row({c: 1.0 for c, (j, _) in enumerate(self.index) if j == i}, 1.0, 1.0)
        for g, n in self.groups.items():  # x <= y; w <= y; w only if no other call is made
            for c, (i, k) in enumerate(self.index):
                if problem.items[i].options[k].group == g:
                    self.row({c: 1.0, self.nx + n: -1.0}, -np.inf, 0.0)
            self.row({self.nx + self.ng + n: 1.0, self.nx + n: -1.0}, -np.inf, 0.0)
            coeffs = {self.nx + m: 1.0 for m in range(self.ng) if m != n}
            coeffs[self.nx + self.ng + n] = float(self.ng)
            self.row(coeffs, -np.inf, float(self.ng))

    def option(self, c: int) -> Option:
        i, k = self.index[c]
        return self.problem.items[i].options[k]

    def row(self, coeffs: dict[int, float], lo: float, hi: float) -> None:
        a = np.zeros(self.n)
        for c, v in coeffs.items():
            a[c] = v
        self.rows.append((a, lo, hi))

    def bytes_row(self, max_bytes: float) -> tuple[np.ndarray, float, float]:
        scale = max(max_bytes, 1.0)  # rows of order 1 keep HiGHS' tolerances below a byte
        a = np.zeros(self.n)
        for c, (i, _) in enumerate(self.index):
            if self.problem.items[i].budgeted:
                a[c] = self.option(c).bytes / scale
        return a, -np.inf, max_bytes / scale

    def constraint_rows(self, max_bytes: float | None) -> list[tuple[np.ndarray, float, float]]:
        p = self.problem
        rows = list(self.rows)
        if max_bytes is not None:
            rows.append(self.bytes_row(max_bytes))
        for tier, cap in p.capacities.items():
            a = np.zeros(self.n)
            for c in range(self.nx):
                if self.option(c).tier == tier:
                    a[c] = self.option(c).bytes / max(cap, 1.0)
            rows.append((a, -np.inf, cap / max(cap, 1.0)))
        if p.max_seconds is not None:
            scale = max(p.max_seconds, 1e-12)
            rows.append((self.seconds_vector() / scale, -np.inf,
                         (p.max_seconds - p.base_seconds) / scale))  # fmt: skip
        return rows

    def seconds_vector(self) -> np.ndarray:
        a = np.zeros(self.n)
        for c in range(self.nx):
            a[c] = self.option(c).seconds
        for g, n in self.groups.items():
            a[self.nx + n] = self.problem.group_seconds.get(g, 0.0)
            a[self.nx + self.ng + n] = -self.problem.group_alone.get(g, 0.0)
        return a

    def loss_vector(self) -> np.ndarray:
        a = np.zeros(self.n)
        for c in range(self.nx):
            a[c] = self.option(c).loss
        return a

    def bytes_vector(self) -> np.ndarray:
        a = np.zeros(self.n)
        for c, (i, _) in enumerate(self.index):
            if self.problem.items[i].budgeted:
                a[c] = self.option(c).bytes
        return a

    def solve(self, objective: np.ndarray, rows: list) -> np.ndarray | None:
        from scipy.optimize import Bounds, LinearConstraint, milp

        a = np.vstack([r[0] for r in rows])
        constraint = LinearConstraint(a, [r[1] for r in rows], [r[2] for r in rows])
        with _quiet_stdout():  # HiGHS prints debug lines from C++ despite disp=False
            res = milp(objective, constraints=constraint, integrality=np.ones(self.n),
                       bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-9})  # fmt: skip
        if res.status != 0 or res.x is None:
            return None
        return np.round(res.x)

    def picks(self, x: np.ndarray) -> tuple[int, ...]:
        out = [0] * len(self.problem.items)
        for c in range(self.nx):
            if x[c] > 0.5:
                i, k = self.index[c]
                out[i] = k
        return tuple(out)


class _quiet_stdout:
    """Context: file descriptor 1 goes to /dev/null (C++ code writes there directly)."""

    def __enter__(self) -> None:
        import os
        import sys

        sys.stdout.flush()
        self.saved = os.dup(1)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 1)

    def __exit__(self, *exc: object) -> None:
        import os

        os.dup2(self.saved, 1)
        os.close(self.saved)
        os.close(self.null)


def _scaled(v: np.ndarray) -> np.ndarray:
    scale = np.abs(v).max()
    return v / scale if scale > 0 else v


def min_feasible_bytes(problem: Problem) -> int | None:
    """The smallest budgeted bytes of any plan meeting the tiers and the latency budget; None
    if none does."""
    model = _Model(problem)
    x = model.solve(_scaled(model.bytes_vector()), model.constraint_rows(None))
    if x is None:
        return None
    return evaluate(problem, model.picks(x)).bytes


def undominated(item: Item) -> list[int]:
    """Indices of the options no other option of the item dominates: one dominates another if it
    is in the same tier and call and no worse in loss, bytes and seconds (better in one, or equal
    in all and listed first)."""
    keep = []
    for k, a in enumerate(item.options):
        beaten = False
        for j, b in enumerate(item.options):
            if j == k or (b.tier, b.group) != (a.tier, a.group):
                continue
            no_worse = b.loss <= a.loss and b.bytes <= a.bytes and b.seconds <= a.seconds
            better = b.loss < a.loss or b.bytes < a.bytes or b.seconds < a.seconds
            if no_worse and (better or j < k):
                beaten = True
                break
        if not beaten:
            keep.append(k)
    return keep


def solve_exact(problem: Problem) -> Solution:
    """The assignment of least predicted loss meeting every constraint (dominated options
    dropped first; ties: the fastest, then the smallest).

    Raises:
        InfeasibleError: no assignment meets the constraints; its `min_bytes` says the smallest
            byte budget that would (None if the tiers or the latency budget are the obstacle).
    """
    kept = [undominated(item) for item in problem.items]
    reduced = Problem(tuple(Item(item.name, tuple(item.options[k] for k in ks), item.budgeted)
                            for item, ks in zip(problem.items, kept)),
                      problem.max_bytes, problem.capacities, problem.max_seconds,
                      problem.group_seconds, problem.group_alone, problem.base_seconds)  # fmt: skip
    s = _solve_exact(reduced)
    picks = tuple(ks[k] for ks, k in zip(kept, s.picks))
    return evaluate(problem, picks, "exact")


def _solve_exact(problem: Problem) -> Solution:
    model = _Model(problem)
    budget = None if problem.max_bytes is None else float(problem.max_bytes)
    for _ in range(4):  # tighten the byte row if rounding let a solution overshoot it
        rows = model.constraint_rows(budget)
        x = model.solve(_scaled(model.loss_vector()), rows)
        if x is None:
            least = min_feasible_bytes(problem)
            raise InfeasibleError(_infeasible_message(problem, least), least)
        best = evaluate(problem, model.picks(x), "exact")
        # second solve: the fastest, then smallest, plan whose loss is within tolerance of best
        loss = model.loss_vector()
        scale = max(np.abs(loss).max(), 1e-300)
        objective = _scaled(model.seconds_vector()) + 1e-6 * _scaled(model.bytes_vector())
        for slack in (LOSS_TOLERANCE, 10 * LOSS_TOLERANCE):  # a looser tie if HiGHS balks
            tie = (loss / scale, -np.inf, best.loss / scale + slack)
            x2 = model.solve(objective, [*rows, tie])
            if x2 is None:
                continue
            second = evaluate(problem, model.picks(x2), "exact")
            if second.loss <= best.loss + 2 * slack * scale and feasible(problem, second):
                best = second
            break
        if feasible(problem, best):
            return best
        if budget is not None and best.bytes > problem.max_bytes:  # type: ignore[operator]
            budget -= best.bytes - problem.max_bytes  # type: ignore[operator]
    raise InfeasibleError("the integer program's solutions kept breaking the constraints by "
                          "rounding; loosen the budget slightly", problem.max_bytes)  # fmt: skip


def _infeasible_message(problem: Problem, least: int | None) -> str:
    if least is None:
        return ("no plan meets the memory-tier capacities and the latency budget, whatever the "
                "byte budget: raise a capacity or the latency budget, or allow more formats")
    return (f"no plan fits {problem.max_bytes:,} bytes; the smallest feasible budget is "
            f"{least:,} bytes")  # fmt: skip


# --------------------------------------------------------------------------- HAGO greedy


def _descending(item: Item) -> list[int]:
    """Option indices from the most bytes to the fewest (ties: the faster first)."""
    return sorted(range(len(item.options)),
                  key=lambda k: (-item.options[k].bytes, item.options[k].seconds))  # fmt: skip


def hago_greedy(problem: Problem, tolerance: float) -> Solution:
    """HAGO's greedy search (GreedySearchTuner) on predicted losses.

    Items are visited in order, each starting from its largest option with the items not yet
    visited at theirs. An item is lowered option by option, from the most bytes to the fewest,
    while the predicted loss of the whole assignment stays within `tolerance` (HAGO: while the
    accuracy does not drop); the first option that breaks it stops the item, which keeps the
    last option accepted and is fixed (HAGO: the best measure so far, ties to fewer bits). An
    option of the same bytes is taken only if it lowers the loss.
    """
    picks = [_descending(item)[0] for item in problem.items]
    total = sum(item.options[k].loss for item, k in zip(problem.items, picks))
    for i, item in enumerate(problem.items):
        current = item.options[picks[i]]
        for k in _descending(item)[1:]:
            trial = item.options[k]
            trial_total = total - current.loss + trial.loss
            if trial.bytes == current.bytes:
                if trial.loss < current.loss:
                    picks[i], current, total = k, trial, trial_total
                continue
            if trial_total > tolerance:
                break
            picks[i], current, total = k, trial, trial_total
    return evaluate(problem, picks, "hago-greedy")


def greedy_for_budget(problem: Problem, grid: int = 120, refine: int = 40) -> Solution:
    """HAGO's greedy search made to meet the constraints: HAGO has no byte or latency budget,
    so its one free parameter, the loss tolerance, is searched: a geometric grid of tolerances
    and a bisection between the largest infeasible and the smallest feasible one; the feasible
    result of least predicted loss is returned.

    Raises:
        InfeasibleError: no tolerance gives a feasible assignment (min_bytes: the exact one).
    """
    losses = [o.loss for item in problem.items for o in item.options]
    top = sum(max(o.loss for o in item.options) for item in problem.items)
    positive = [v for v in losses if v > 0]
    low = min(positive) if positive else 1e-12
    taus = [0.0] + list(np.geomspace(low * 1e-3, max(top, low) * 1.01, grid))
    best: Solution | None = None

    def consider(tau: float) -> bool:
        nonlocal best
        s = hago_greedy(problem, float(tau))
        if not feasible(problem, s):
            return False
        if best is None or (s.loss, s.bytes) < (best.loss, best.bytes):
            best = s
        return True

    results = [consider(t) for t in taus]
    ok = [t for t, r in zip(taus, results) if r]
    if ok:
        hi = min(ok)
        lower = [t for t in taus if t < hi]
        lo = max(lower) if lower else 0.0
        for _ in range(refine):
            mid = 0.5 * (lo + hi)
            if consider(mid):
                hi = mid
            else:
                lo = mid
    if best is None:
        least = min_feasible_bytes(problem)
        raise InfeasibleError("HAGO's greedy search found no tolerance that meets the "
                              "constraints; " + _infeasible_message(problem, least), least)  # fmt: skip
    return best
