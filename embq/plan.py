"""`Plan`: what each embedding table and the dense towers of a model become.

A plan is typed and frozen. It parses from, and prints to, the short forms users already write::

    int4-greedy                                  every table int4-greedy, dense towers fp32
    {"*": "int4-opt", "t_cat_0": "int8"}         per table; "*" is the default
    brecq:w4a8                                   dense towers only; tables stay fp32
    {"tables": {"*": "int4-opt"}, "dense": "brecq:w4a8"}      both (the JSON of plan.json)
    {"tables": {"*": "int2-opt", "t_a": "int4-opt"}, "kernels": {"t_a": "compact"}}
                                                 the runtime's kernel choice per table
                                                 (`embq.runtime.kernel_choice`; "auto" if
                                                 none), as `embq plan` writes it

and `Plan.parse(str(p)) == p` and `Plan.parse(p.to_json()) == p` for every plan. Table formats
are `embq.embedding.configs` configs (so `int4-greedy(n_bins=100)` works); dense specs are
`embq.dense.configs.DenseConfig`s. This module imports neither torch nor faiss.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from embq.dense.configs import DenseConfig, parse_dense
from embq.embedding.configs import FormatConfig, parse_format
from embq.errors import ConfigError
from embq.runtime.kernel_choice import check_kernel_choice

DEFAULT_KEY = "*"  # the tables entry that applies to every table not named
PLAN_KEYS = ("tables", "kernels", "dense")


def _check_table_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"plan table names are non-empty strings, got {key!r}")
    return key


def _per_table(items: Any, parse: Any, repeated: str) -> tuple[tuple[str, Any], ...]:
    """(table name, parse(value)) pairs of a mapping or pair sequence, in order; a name given
    twice is a ConfigError (`repeated`, with {key} for the name)."""
    pairs, seen = [], set()
    for key, value in items.items() if isinstance(items, Mapping) else items:
        key = _check_table_key(key)
        if key in seen:
            raise ConfigError(repeated.format(key=repr(key)))
        seen.add(key)
        pairs.append((key, parse(value)))
    return tuple(pairs)


@dataclass(frozen=True, eq=True)
class Plan:
    """A quantization plan.

    Args:
        tables: (table name, format config) pairs, in order; the name "*" is the default for
            tables not named. Empty: every table stays fp32.
        dense: the dense towers' method, or None for fp32 towers.
        kernels: (table name, runtime kernel choice) pairs ("auto", "compact", "tbe"), "*" the
            default; a table named nowhere is served as the caller (or the artifact) says.
    """

    tables: tuple[tuple[str, FormatConfig], ...] = ()
    dense: DenseConfig | None = None
    kernels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        pairs = _per_table(self.tables, parse_format, "the plan names table {key} twice")
        object.__setattr__(self, "tables", pairs)
        if self.dense is not None:
            object.__setattr__(self, "dense", parse_dense(self.dense))
        choices = _per_table(self.kernels, check_kernel_choice, "the plan gives table {key} two kernels")
        object.__setattr__(self, "kernels", choices)
        if not pairs and self.dense is None:
            raise ConfigError(
                "an empty plan: a plan is a format name or a non-empty {table: format} dict, "
                "a dense method, or both"
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def uniform(cls, fmt: str | FormatConfig, dense: str | DenseConfig | None = None) -> Plan:
        """Every table in `fmt`."""
        return cls(((DEFAULT_KEY, parse_format(fmt)),), dense)

    @classmethod
    def parse(cls, plan: Any) -> Plan:
        """A Plan from any of its forms: a Plan, a format name or config, a dense spec
        ("brecq:w4a8"), JSON text, or a dict ({table: format} or {"tables": ..., "dense": ...}).

        Raises:
            ConfigError: anything else, an unknown format or method, or an empty plan.
        """
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, FormatConfig):
            return cls.uniform(plan)
        if isinstance(plan, DenseConfig):
            return cls((), plan)
        if isinstance(plan, str):
            text = plan.strip()
            if text.startswith("{"):
                try:
                    return cls.parse(json.loads(text))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"the plan is not valid JSON: {e}") from e
            if ":" in text:
                return cls((), parse_dense(text))
            return cls.uniform(text)
        if isinstance(plan, Mapping):
            if any(k in plan for k in PLAN_KEYS):
                unknown = sorted(set(plan) - set(PLAN_KEYS))
                if unknown:
                    raise ConfigError(f"a plan holds 'tables', 'kernels' and 'dense', not {unknown}")
                tables, kernels = plan.get("tables") or {}, plan.get("kernels") or {}
                for key, value in (("tables", tables), ("kernels", kernels)):
                    if not isinstance(value, Mapping):
                        raise ConfigError(f"the plan's {key!r} must be an object, got {value!r}")
                return cls(tuple(tables.items()), plan.get("dense"), tuple(kernels.items()))
            return cls(tuple(plan.items()))
        raise ConfigError(
            f"a plan is a format name, a dense spec, JSON or a non-empty {{table: format}} dict, "
            f"got {plan!r}"
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """A plan from a JSON file (plan.json), as `parse` reads it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read the plan file {path}: {e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"the plan file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object: {{table: format}} or "
                              "{\"tables\": ..., \"dense\": ...}")  # fmt: skip
        return cls.parse(data)

    # ------------------------------------------------------------------ reading

    @property
    def table_formats(self) -> dict[str, FormatConfig]:
        """{table name or "*": format config}, in order."""
        return dict(self.tables)

    def format_for(self, table: str) -> FormatConfig | None:
        """The format of `table`: its own entry, else the "*" default, else None."""
        formats = self.table_formats
        return formats.get(table, formats.get(DEFAULT_KEY))

    def kernel_for(self, table: str) -> str | None:
        """The runtime kernel choice of `table`: its own entry, else the "*" default, else None."""
        kernels = dict(self.kernels)
        return kernels.get(table, kernels.get(DEFAULT_KEY))

    def with_sampling(self, sample_rows: int | None = None, seed: int | None = None) -> Plan:
        """This plan with the row sample of every codebook / PQ format set (None: unchanged)."""
        changes = {k: v for k, v in (("sample_rows", sample_rows), ("seed", seed)) if v is not None}
        if not changes:
            return self
        tables = tuple((k, replace(v, **changes) if v.fits_params else v) for k, v in self.tables)
        return Plan(tables, self.dense, self.kernels)

    def with_dense(self, dense: str | DenseConfig | None) -> Plan:
        """This plan with its dense towers' method replaced."""
        return Plan(self.tables, dense, self.kernels)

    def with_kernels(self, kernels: Mapping[str, str] | None) -> Plan:
        """This plan with its per-table kernel choices replaced ({table or "*": choice})."""
        return Plan(self.tables, self.dense, tuple((kernels or {}).items()))

    def to_json(self) -> dict[str, Any]:
        """The plan.json form: {"tables": {name: format}, "dense": spec or None}, and
        "kernels": {name: choice} when the plan chooses kernels."""
        out: dict[str, Any] = {"tables": {k: str(v) for k, v in self.tables}}
        if self.kernels:
            out["kernels"] = dict(self.kernels)
        out["dense"] = None if self.dense is None else str(self.dense)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (plan.json), replacing the file atomically."""
        from embq.files import staged_file

        path = Path(path)
        with staged_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return path

    def __str__(self) -> str:
        tables = {k: str(v) for k, v in self.tables}
        if self.kernels:
            return json.dumps(self.to_json())
        if self.dense is None:
            if list(tables) == [DEFAULT_KEY]:
                return tables[DEFAULT_KEY]
            return json.dumps(tables)
        if not tables:
            return str(self.dense)
        return json.dumps({"tables": tables, "dense": str(self.dense)})
