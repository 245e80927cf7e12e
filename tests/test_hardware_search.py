"""The exact plan search against brute force (every assignment tried), on small random
instances with byte budgets, tier capacities, latency budgets and shared call overheads;
infeasible budgets; HAGO's greedy baseline."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from embq.hardware.search import (
    LOSS_TOLERANCE,
    InfeasibleError,
    Item,
    Option,
    Problem,
    evaluate,
    feasible,
    greedy_for_budget,
    hago_greedy,
    min_feasible_bytes,
    solve_exact,
)


def brute_force(problem: Problem):
    """(best loss, smallest feasible bytes) over every assignment, or (None, None)."""
    best, least = None, None
    for picks in itertools.product(*(range(len(it.options)) for it in problem.items)):
        s = evaluate(problem, picks)
        if feasible(problem, s):
            best = s.loss if best is None else min(best, s.loss)
        relaxed = replace(problem, max_bytes=None)
        if feasible(relaxed, s):
            least = s.bytes if least is None else min(least, s.bytes)
    return best, least


def random_problem(rng: np.random.Generator, items: int, options: int, tight: float) -> Problem:
    groups = ["g0", "g1", "g2"]
    built = []
    for i in range(items):
        opts = []
        for k in range(int(rng.integers(1, options + 1))):
            opts.append(Option(
                label=f"o{k}", loss=float(rng.exponential(1e-4) * (rng.random() < 0.9)),
                bytes=int(rng.integers(1, 1000)), tier=str(rng.choice(["fast", "slow"])),
                seconds=float(rng.uniform(0, 5e-5)), group=str(rng.choice(groups)),
            ))  # fmt: skip
        built.append(Item(f"t{i}", tuple(opts), budgeted=bool(rng.random() < 0.85)))
    total = sum(max(o.bytes for o in it.options) for it in built if it.budgeted)
    lo = sum(min(o.bytes for o in it.options) for it in built if it.budgeted)
    return Problem(
        tuple(built),
        max_bytes=int(lo + (total - lo) * tight) if rng.random() < 0.9 else None,
        capacities={"fast": int(rng.integers(200, 3000))} if rng.random() < 0.5 else {},
        max_seconds=float(rng.uniform(5e-5, 3e-4)) if rng.random() < 0.5 else None,
        group_seconds={g: float(rng.uniform(0, 3e-5)) for g in groups},
        group_alone={g: float(rng.uniform(0, 1e-5)) for g in groups},
        base_seconds=float(rng.uniform(0, 2e-5)),
    )


@pytest.mark.parametrize("seed", range(60))
def test_exact_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, items=int(rng.integers(1, 6)), options=4,
                             tight=float(rng.uniform(0.0, 0.8)))  # fmt: skip
    best, least = brute_force(problem)
    if best is None:
        with pytest.raises(InfeasibleError) as info:
            solve_exact(problem)
        # the smallest feasible budget is what brute force finds without the byte budget
        assert info.value.min_bytes == least
        if least is not None:
            assert f"{least:,} bytes" in str(info.value)
            relaxed = replace(problem, max_bytes=least)
            assert feasible(relaxed, solve_exact(relaxed))
        return
    s = solve_exact(problem)
    assert feasible(problem, s)
    # optimal up to the documented tie tolerance (a second solve picks the fastest of the ties)
    largest = max(o.loss for item in problem.items for o in item.options)
    assert best - 1e-15 <= s.loss <= best + 2 * LOSS_TOLERANCE * largest + 1e-15
    assert min_feasible_bytes(replace(problem, max_bytes=None)) == least
    greedy = greedy_for_budget(problem) if _greedy_ok(problem) else None
    if greedy is not None:
        assert feasible(problem, greedy) and s.loss <= greedy.loss + 1e-15


def _greedy_ok(problem: Problem) -> bool:
    try:
        greedy_for_budget(problem)
        return True
    except InfeasibleError:
        return False


def test_ties_go_to_the_faster_then_smaller_option():
    # same loss, three kernels: the exact search takes the fastest among those that fit
    item = Item("t", (Option("a", 1e-4, 16, seconds=3e-6), Option("b", 1e-4, 12, seconds=5e-6),
                      Option("c", 1e-4, 12, seconds=4e-6)))  # fmt: skip
    assert solve_exact(Problem((item,), max_bytes=100)).picks == (0,)
    assert solve_exact(Problem((item,), max_bytes=12)).picks == (2,)


def test_infeasible_budget_names_the_smallest_feasible_one():
    items = tuple(Item(f"t{i}", (Option("big", 0.0, 100), Option("small", 1e-3, 30)))
                  for i in range(3))  # fmt: skip
    with pytest.raises(InfeasibleError, match="smallest feasible budget is 90 bytes") as info:
        solve_exact(Problem(items, max_bytes=89))
    assert info.value.min_bytes == 90
    assert solve_exact(Problem(items, max_bytes=90)).picks == (1, 1, 1)
    # tiers that cannot hold anything: no byte budget helps
    tiered = tuple(Item(i.name, tuple(Option(o.label, o.loss, o.bytes, "hbm") for o in i.options))
                   for i in items)  # fmt: skip
    with pytest.raises(InfeasibleError, match="whatever the byte budget") as info:
        solve_exact(Problem(tiered, max_bytes=1000, capacities={"hbm": 50}))
    assert info.value.min_bytes is None


def test_hago_greedy_walks_in_order_and_stops_at_the_first_drop():
    # item 0 can go to 50 bytes within tolerance; item 1's middle option breaks it, so HAGO
    # stops there even though its smallest option would have fitted
    items = (
        Item("a", (Option("a0", 0.0, 100), Option("a1", 1.0, 50))),
        Item("b", (Option("b0", 0.0, 100), Option("b1", 5.0, 60), Option("b2", 0.5, 10))),
    )
    s = hago_greedy(Problem(items), tolerance=2.0)
    assert s.picks == (1, 0) and s.loss == 1.0 and s.bytes == 150
    exact = solve_exact(Problem(items, max_bytes=60))
    assert exact.picks == (1, 2) and exact.loss == 1.5
    # at 150 bytes the greedy walk must spend item a's bytes first (loss 1.0); the exact
    # search keeps a whole and drops b to its smallest option (loss 0.5)
    greedy = greedy_for_budget(Problem(items, max_bytes=150))
    assert greedy.picks == (1, 0) and greedy.loss == 1.0
    assert solve_exact(Problem(items, max_bytes=150)).loss == 0.5


@pytest.mark.parametrize("seed", range(20))
def test_one_byte_under_the_smallest_feasible_budget_is_infeasible(seed):
    rng = np.random.default_rng(100 + seed)
    base = random_problem(rng, items=int(rng.integers(1, 5)), options=3, tight=1.0)
    unbounded = replace(base, max_bytes=None)
    _, least = brute_force(unbounded)
    if least is None:  # the tiers / latency rule everything out: said so, with no budget
        with pytest.raises(InfeasibleError, match="whatever the byte budget"):
            solve_exact(unbounded)
        return
    at = replace(base, max_bytes=least)
    assert feasible(at, solve_exact(at))
    if least == 0:
        return
    under = replace(base, max_bytes=least - 1)
    with pytest.raises(InfeasibleError, match=f"smallest feasible budget is {least:,} bytes"):
        solve_exact(under)


def test_a_coarser_format_with_the_same_bytes_is_never_picked():
    """fbgemm's CUDA TBE pads int2 and int4 rows of dim 16 to 16 bytes alike: int2 (predicted no
    better than int4) is dominated and the exact search never takes it, at any budget."""
    from embq.hardware.search import undominated

    def item(name: str, int4_loss: float) -> Item:
        return Item(name, (Option("int8", 0.0, 32, "hbm", 1e-6, "tbe/16"),
                           Option("int4", int4_loss, 16, "hbm", 1e-6, "tbe/16"),
                           Option("int2", int4_loss + 1e-9, 16, "hbm", 1e-6, "tbe/16")))  # fmt: skip

    items = tuple(item(f"t{i}", 1e-5 * (i + 1)) for i in range(4))
    assert undominated(items[0]) == [0, 1]
    for budget in range(64, 129, 16):
        s = solve_exact(Problem(items, max_bytes=budget))
        assert all(o.label != "int2" for o in s.options(Problem(items))), budget
