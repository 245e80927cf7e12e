"""The plan search end to end: sensitivity on calibration rows -> the search on a hardware spec
-> the plan quantized and measured on held-out rows the sensitivity never saw.

    planner = Planner(model, PreparedData("runs/demo/prepared"), load_spec("x86-fbgemm"))
    planned = planner.plan(0.15)                  # a fraction of fp32 bytes, or bytes
    planned.plan                                  # an embq.Plan (formats and kernels per table)
    planner.measure_loss([planned])               # held-out log loss, measured
    planner.measure_latency([planned])            # the runtime's lookups at the spec's batch

Rows: the held-out rows are the last `valid_fraction` of the dataset (what `embq train` holds
out). Calibration rows are the last `calib_rows` rows before them ("train", the default) or the
first half of the held-out rows ("holdout"; the other half is then the held-out set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from embq.data.prepared import PreparedData
from embq.errors import ConfigError
from embq.hardware.accounting import TableChoice, fp32_bytes, table_choices
from embq.hardware.cost import (
    dense_seconds,
    group_seconds,
    lookup_seconds,
    reorder_seconds,
    table_seconds,
)
from embq.hardware.dense import dense_config, dense_layers, dense_sensitivity, layer_bytes
from embq.hardware.encodings import Encodings
from embq.hardware.search import (
    InfeasibleError,
    Item,
    Option,
    Problem,
    Solution,
    greedy_for_budget,
    min_feasible_bytes,
    solve_exact,
)
from embq.hardware.sensitivity import Sensitivity, collect, table_sensitivity
from embq.hardware.spec import DenseKernel, HardwareSpec
from embq.models.tables import find_tables
from embq.plan import Plan

PQ_SAMPLE_ROWS = 16384  # rows the planner's PQ candidates are fitted on (a quarter of the default)
CALIBRATIONS = ("train", "holdout")


def default_formats(dim: int, quick: bool = False) -> list[str]:
    """Candidate formats: floats, int8, the best 4-/2-bit searches, PQ at 2 and 4 bits a value
    (one PQ with `quick`)."""
    out = ["fp32", "fp16", "int8", "int4-opt", "int2-opt"]
    for m in (dim // 4,) if quick else (dim // 4, dim // 2):
        if m >= 1 and dim % m == 0:
            out.append(f"pq{m}x8(sample_rows={PQ_SAMPLE_ROWS})")
    return out


def budget_bytes(budget: float | int, total_fp32: int) -> int:
    """A byte budget: a fraction of the fp32 bytes (<= 1) or a number of bytes (> 1)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigError(f"a byte budget is a fraction of fp32 (0 < b <= 1) or bytes (> 1), "
                          f"got {budget!r}")  # fmt: skip
    return int(round(budget * total_fp32)) if budget <= 1 else int(budget)


@dataclass
class Planned:
    """A plan the search chose (or a uniform format), with its predictions and measurements.

    Attributes:
        name: e.g. "exact@0.15", "greedy@0.15", "uniform int4-opt".
        plan: the `embq.Plan` (formats, and runtime kernels where embq serves the target).
        choices: each table's `TableChoice`, in model order.
        predicted: {"bytes", "bytes_ratio" (tables), "loss" (nats), "loss_pct", "seconds"
            (lookups), "dense_seconds", "dense_bytes"}.
        measured: filled by `Planner.measure_loss` / `measure_latency`.
        solution: the search's `Solution` (None for uniform plans).
        dense: {layer: dense kernel} when the plan chooses the dense layers.
    """

    name: str
    plan: Plan
    choices: list[TableChoice]
    predicted: dict[str, float]
    measured: dict[str, float] = field(default_factory=dict)
    solution: Solution | None = None
    dense: dict[str, DenseKernel] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """A flat, JSON-able summary."""
        formats: dict[str, int] = {}
        for c in self.choices:
            formats[c.label] = formats.get(c.label, 0) + 1
        for layer, k in self.dense.items():
            formats[f"{layer}:{k.name}"] = 1
        return {"name": self.name, **{f"predicted_{k}": v for k, v in self.predicted.items()},
                **{f"measured_{k}": v for k, v in self.measured.items()}, "choices": formats}  # fmt: skip


class Planner:
    """Sensitivity, search and verification of plans for one model, dataset and target.

    Args:
        model: the float TorchRec DLRM (embq's: one table `t_<feature>` per feature).
        data: the prepared dataset it was trained on.
        spec: the target (`embq.hardware.spec.load_spec`).
        formats: candidate formats (default: `default_formats` at the model's dim).
        calib_rows: calibration rows.
        calibration: "train" or "holdout" (see the module docstring).
        valid_fraction: the held-out share, as `embq train` used it.
        sensitivity: "exact" or "proxy".
        cache_dir: where sensitivities are cached as JSON (None: not cached).
        batch: the batch the latency model and measurements use (default: the spec's).
        dense: also choose a dense kernel per layer of the towers (`embq.hardware.dense`).
    """

    def __init__(self, model: torch.nn.Module, data: PreparedData, spec: HardwareSpec, *,
                 formats: list[str] | None = None, calib_rows: int = 50_000,
                 calibration: str = "train", valid_fraction: float = 0.1,
                 sensitivity: str = "exact", cache_dir: Any = None, batch: int | None = None,
                 progress: bool = True, quick: bool = False, dense: bool = False) -> None:  # fmt: skip
        from embq.models.dlrm import config_from_model

        if calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        self.model, self.data, self.spec = model, data, spec
        self.config = config_from_model(model)
        self.tables = find_tables(model)
        self.dim = self.tables[0].dim
        self.formats = formats or default_formats(self.dim, quick)
        self.total_fp32 = sum(fp32_bytes(t.rows, t.dim) for t in self.tables)
        (train_start, train_stop), (held_start, held_stop) = data.split(valid_fraction)
        if calibration == "train":
            if calib_rows > train_stop - train_start:
                raise ConfigError(f"calib_rows {calib_rows} exceeds the {train_stop} training rows")
            self.calib_range = (train_stop - calib_rows, train_stop)
            self.heldout_range = (held_start, held_stop)
        else:
            middle = (held_start + held_stop) // 2
            self.calib_range = (held_start, min(middle, held_start + calib_rows))
            self.heldout_range = (middle, held_stop)
        self.calibration, self.method, self.cache_dir = calibration, sensitivity, cache_dir
        self.batch = int(batch or spec.batch)
        self.progress = progress
        self.encodings = Encodings(self.tables)
        self._sens: Sensitivity | None = None
        self._heldout: list | None = None
        self._fp32_loss: float | None = None
        self.dense = dense
        self.dense_layers = dense_layers(model) if dense else []
        self._dense_sens: dict[str, dict[str, float]] | None = None
        if dense and not spec.dense_kernels:
            raise ConfigError(f"{spec.name} lists no dense kernels; plan the tables only")

    # ------------------------------------------------------------------ sensitivity and search

    def reuse(self, other: Planner) -> Planner:
        """Share `other`'s sensitivity and encodings (the same model, rows and formats planned
        for another target): nothing is measured twice."""
        if (other.model is not self.model or other.calib_range != self.calib_range
                or other.formats != self.formats):  # fmt: skip
            raise ConfigError("reuse() needs a planner of the same model, rows and formats")
        self._sens, self.encodings = other.sensitivity(), other.encodings
        return self

    def sensitivity(self) -> Sensitivity:
        """Every table's sensitivity to every candidate format (computed once, cached)."""
        if self._sens is None:
            start, stop = self.calib_range
            cal = collect(self.model, self.data.batches(start, stop, batch_size=8192))
            self._sens = table_sensitivity(self.model, cal, self.formats, method=self.method,
                                           encodings=self.encodings, cache_dir=self.cache_dir,
                                           progress=self.progress)  # fmt: skip
        return self._sens

    def dense_sensitivity(self) -> dict[str, dict[str, float]]:
        """{layer: {dense kernel: loss increase}} on the calibration rows (computed once; cached
        as JSON beside the tables' sensitivity, keyed by it and the kernels' bits)."""
        if self._dense_sens is None:
            import hashlib
            import json
            from pathlib import Path

            bits = sorted((k.name, k.w_bits, k.a_bits) for k in self.spec.dense_kernels.values())
            key = hashlib.sha256(json.dumps([self.sensitivity().key, bits]).encode()).hexdigest()
            path = Path(self.cache_dir) / f"dense-{key[:20]}.json" if self.cache_dir else None
            if path is not None and path.is_file():
                self._dense_sens = json.loads(path.read_text(encoding="utf-8"))
            else:
                self._dense_sens = dense_sensitivity(self.model, self.calibration_batches(),
                                                     self.spec, self.progress)  # fmt: skip
                if path is not None:
                    from embq.files import staged_file

                    with staged_file(path) as tmp:
                        tmp.write_text(json.dumps(self._dense_sens), encoding="utf-8")
        return self._dense_sens

    def calibration_batches(self) -> list:
        return list(self.data.batches(*self.calib_range, batch_size=8192))

    def ids(self) -> list[float]:
        """Ids each table looks up in a batch of `batch` rows (calibration's ids per row)."""
        sens = self.sensitivity()
        return [self.batch * sens.tables[t.name]["ids_per_row"] for t in self.tables]

    def outs(self) -> list[float]:
        """Pooled floats each table writes in a batch: batch x its features x dim."""
        return [float(self.batch * len(t.feature_names) * t.dim) for t in self.tables]

    def choices(self) -> list[list[TableChoice]]:
        """Each table's choices on the target among the formats it has a sensitivity for."""
        sens = self.sensitivity()
        out = []
        for t in self.tables:
            measured = set(sens.formats(t.name))
            options = [c for c in table_choices(self.spec, t.rows, t.dim, self.formats)
                       if c.format in measured]  # fmt: skip
            out.append(options)
        return out

    def problem(self, max_bytes: int | None = None, max_seconds: float | None = None,
                capacities: bool = True) -> Problem:  # fmt: skip
        """The search problem: one item per table, its options' predicted loss, bytes, tier and
        seconds; the spec's tier capacities (unless `capacities` is False)."""
        sens, ids = self.sensitivity(), self.ids()
        items, calls, alone = [], {}, {}
        n = len(self.tables)
        batch_ids = float(sum(ids))
        for t, opts, n_ids, out in zip(self.tables, self.choices(), ids, self.outs()):
            options = []
            for c in opts:
                options.append(Option(c.label, sens.predicted(t.name, c.format), c.bytes, c.tier,
                                      table_seconds(self.spec, c, n_ids, n, out), c.group))  # fmt: skip
                both = group_seconds(self.spec, c, batch_ids, alone=False)
                calls[c.group] = both
                alone[c.group] = both - group_seconds(self.spec, c, batch_ids, alone=True)
            items.append(Item(t.name, tuple(options)))
        for layer in self.dense_layers:  # not in the byte budget: in their tier and latency
            sens = self.dense_sensitivity()[layer.name]
            options = [Option(k.name, max(0.0, sens[k.name]), layer_bytes(layer, k), k.memory,
                              dense_seconds(k, self.batch, layer.in_features, layer.out_features))
                       for k in self.spec.dense_kernels.values()]  # fmt: skip
            items.append(Item(layer.name, tuple(options), budgeted=False))
        reorder = reorder_seconds(self.spec, sum(self.outs()))
        alone = {g: v + reorder for g, v in alone.items()}  # one call: no reorder either
        caps = {k: v.capacity_bytes for k, v in self.spec.memory.items()} if capacities else {}
        return Problem(tuple(items), max_bytes, caps, max_seconds, calls, alone, reorder)

    def planned(self, name: str, choices: list[TableChoice], solution: Solution | None = None,
                dense: dict[str, DenseKernel] | None = None) -> Planned:  # fmt: skip
        """A `Planned` of one choice per table (and dense kernel per layer), with predictions."""
        sens = self.sensitivity()
        dense = dense or {}
        loss = sum(sens.predicted(t.name, c.format) for t, c in zip(self.tables, choices))
        loss += sum(max(0.0, self.dense_sensitivity()[n][k.name]) for n, k in dense.items())
        nbytes = sum(c.bytes for c in choices)
        tables = {t.name: c.format for t, c in zip(self.tables, choices)}
        kernels = {t.name: c.runtime for t, c in zip(self.tables, choices)
                   if c.runtime not in (None, "auto")}  # fmt: skip
        plan = Plan(tuple(tables.items()), dense_config(dense) if dense else None,
                    tuple(kernels.items()))  # fmt: skip
        seconds = lookup_seconds(self.spec, choices, self.ids(), self.outs())["seconds"]
        layers = {q.name: q for q in self.dense_layers}
        predicted = {"bytes": nbytes, "bytes_ratio": nbytes / self.total_fp32, "loss": loss,
                     "loss_pct": 100.0 * loss / sens.base_loss, "seconds": seconds}  # fmt: skip
        if dense:
            predicted["dense_seconds"] = sum(
                dense_seconds(k, self.batch, layers[n].in_features, layers[n].out_features)
                for n, k in dense.items())  # fmt: skip
            predicted["dense_bytes"] = sum(layer_bytes(layers[n], k) for n, k in dense.items())
        return Planned(name, plan, list(choices), predicted, solution=solution, dense=dense)

    def plan(self, budget: float | int | None, solver: str = "exact",
             max_seconds: float | None = None) -> Planned:  # fmt: skip
        """The plan of least predicted loss within `budget` (a fraction of fp32 bytes or bytes;
        None: no byte budget) and `max_seconds` of lookups per batch (None: no latency budget),
        by the exact search ("exact") or HAGO's greedy one ("greedy").

        Raises:
            InfeasibleError: no plan fits; the message gives the smallest feasible budget (bytes
                and fraction of fp32) on this target.
        """
        max_bytes = None if budget is None else budget_bytes(budget, self.total_fp32)
        problem = self.problem(max_bytes, max_seconds)
        try:
            if solver == "exact":
                solution = solve_exact(problem)
            elif solver == "greedy":
                solution = greedy_for_budget(problem)
            else:
                raise ConfigError(f"solver must be 'exact' or 'greedy', got {solver!r}")
        except InfeasibleError as e:
            raise InfeasibleError(self._infeasible(max_bytes, max_seconds, e.min_bytes),
                                  e.min_bytes) from None  # fmt: skip
        n = len(self.tables)
        choices = [self.choices()[i][k] for i, k in enumerate(solution.picks[:n])]
        kernels = list(self.spec.dense_kernels.values())
        dense = {q.name: kernels[k] for q, k in zip(self.dense_layers, solution.picks[n:])}
        label = "budget" if budget is None else (f"{budget:g}" if budget <= 1 else f"{budget}B")
        return self.planned(f"{solver}@{label}", choices, solution, dense)

    def _infeasible(self, max_bytes: int | None, max_seconds: float | None,
                    least: int | None) -> str:  # fmt: skip
        where = f"on {self.spec.name}"
        if least is None:
            return (f"no plan meets {where}'s memory capacities"
                    + (f" and {max_seconds * 1e3:.3f} ms of lookups" if max_seconds else "")
                    + " whatever the byte budget; allow more formats or a larger latency budget")
        return (f"no plan fits {max_bytes:,} bytes ({max_bytes / self.total_fp32:.4f} of fp32) "
                f"{where}: the smallest feasible budget there is {least:,} bytes "
                f"({least / self.total_fp32:.4f} of fp32)")  # fmt: skip

    def min_bytes(self) -> int | None:
        """The smallest bytes any plan takes on the target (tiers included)."""
        return min_feasible_bytes(self.problem())

    def uniform(self, fmt: str) -> Planned | None:
        """Every table in `fmt` on its kernel of fewest bytes (ties: the fastest); tables the
        format cannot store keep fp16 (as `embq.quantize` does for a default format). None if
        the target cannot serve the format."""
        from embq.embedding.configs import parse_format

        fmt = str(parse_format(fmt))
        chosen = []
        for options, n_ids, out in zip(self.choices(), self.ids(), self.outs()):
            own = [c for c in options if c.format == fmt] or [c for c in options if c.format == "fp16"]
            if not own:
                return None
            chosen.append(min(own, key=lambda c: (c.bytes, table_seconds(self.spec, c, n_ids, 1, out))))
        if not any(c.format == fmt for c in chosen):
            return None
        return self.planned(f"uniform {fmt}", chosen)

    # ------------------------------------------------------------------ verification

    def heldout_batches(self, batch_size: int = 8192) -> list:
        if self._heldout is None:
            start, stop = self.heldout_range
            self._heldout = list(self.data.batches(start, stop, batch_size=batch_size))
        return self._heldout

    def runtime_model(self, planned: Planned) -> torch.nn.Module:
        """The plan quantized (each table encoded as `embq.quantize` would) on embq's runtime,
        each table on the kernel the plan chose ("auto" where the target is not embq's)."""
        from embq.models.tables import dense_state_dict
        from embq.runtime.load import build_inference_model

        tables = [self.encodings.table(t.name, c.format) for t, c in zip(self.tables, planned.choices)]
        kernels = {t.name: c.runtime or "auto" for t, c in zip(self.tables, planned.choices)}
        tensors, meta = dense_state_dict(self.model), {"kind": "fp32"}
        if planned.plan.dense is not None:  # the towers as embq.quantize quantizes them
            from embq.dense.api import quantize
            from embq.dense.serialize import dense_section

            d = planned.plan.dense
            towers = quantize(self.model, d.method, d.w_bits, d.a_bits,
                              calib=self.calibration_batches(), **d.option_dict)  # fmt: skip
            tensors, meta = dense_section(towers)
        return build_inference_model(self.config, tables, tensors, meta, kernel=kernels)

    def measure_loss(self, plans: list[Planned]) -> None:
        """Held-out log loss of each plan on embq's runtime, and its change vs fp32 (percent);
        the bytes the runtime holds (its metadata's memory_bytes) where the target is embq's."""
        from embq.models.metrics import evaluate

        if self._fp32_loss is None:  # the float TorchRec model, as embq's quality table does
            self._fp32_loss = evaluate(self.model, self.heldout_batches())["logloss"]
        for p in plans:
            model = self.runtime_model(p)
            metrics = evaluate(model, self.heldout_batches())
            p.measured["loss"] = metrics["logloss"]
            p.measured["loss_pct"] = 100.0 * (metrics["logloss"] / self._fp32_loss - 1.0)
            p.measured["auc"] = metrics["auc"]
            if all(c.runtime is not None for c in p.choices):
                held = model.metadata["memory_bytes"]
                p.measured["bytes"] = held
                p.measured["bytes_ratio"] = held / self.total_fp32
            del model

    def lookup_inputs(self, count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`count` held-out batches of `batch` rows as (values, offsets) for the lookups."""
        start, stop = self.heldout_range
        out = []
        for b in self.data.batches(start, min(stop, start + count * self.batch), self.batch):
            if len(b) == self.batch:
                out.append((b.sparse.values().to(torch.int64), b.sparse.offsets().to(torch.int64)))
        if not out:
            raise ConfigError(f"fewer held-out rows than one batch of {self.batch}")
        return out

    def measure_latency(self, plans: list[Planned], rounds: int = 5,
                        threads: int = 1) -> None:  # fmt: skip
        """Median seconds of each plan's lookups (the runtime's embedding module on held-out
        batches of `batch` rows), timed in interleaved rounds on `threads` torch threads:
        "seconds" by the calling thread's CPU clock with one thread (the probe's clock: the
        latency on an idle machine), else by the wall clock; "wall_seconds" beside it."""
        from embq.hardware.timing import interleaved_medians

        runnable = [p for p in plans if all(c.runtime is not None for c in p.choices)]
        inputs = self.lookup_inputs()
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fns = {}
            for p in runnable:
                bags = self.runtime_model(p).core.embeddings
                fns[p.name] = lambda x, m=bags: m(*x)
            medians = interleaved_medians(fns, inputs, rounds=rounds, min_calls=10,
                                          min_seconds=0.05)  # fmt: skip
        finally:
            torch.set_num_threads(old)
        clock = "cpu" if threads == 1 else "wall"
        for p in runnable:
            seconds = medians[p.name][clock]
            p.measured["seconds"] = seconds
            p.measured["wall_seconds"] = medians[p.name]["wall"]
            p.measured["latency_rel_error"] = abs(p.predicted["seconds"] - seconds) / seconds

