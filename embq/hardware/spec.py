"""Hardware specs: what a target can serve, how many bytes a table really takes there, and what
a lookup or a dense layer costs. Typed, frozen, loaded from YAML and checked key by key.

A spec is a YAML file (the shipped ones are in `embq/hardware/specs/`; `load_spec` takes their
name or any path)::

    name: x86-fbgemm
    description: ...
    machine: {cpu: "...", threads: 1, probe: "..."}   # where the cost coefficients come from
    sources: ["repository path: fact", ...]             # citations, free text
    qparams_bytes: 4            # fp16 scale + fp16 bias of a row-wise row
    cache_line: 64
    cache_bytes: 33554432       # last-level cache; a table beyond its share reads memory
    batch: 512                  # the batch the latency model is quoted at (--latency-batch)
    memory:                     # tiers: capacity (bytes) and bandwidth (GB/s)
      dram: {capacity_bytes: 24e9, bandwidth_gb_s: 20}
    lookup_kernels:             # one entry per way of serving a table
      auto:
        runtime: auto           # embq's runtime kernel choice that serves it; null if embq's
                                # runtime cannot run this target (the plan is still written)
        serves: fbgemm-tbe      # kernels with the same "serves" and row alignment form one
                                # call (fbgemm groups tables into one TBE)
        formats: [fp32, fp16, int8, int4, int2]   # format keys (see FORMAT_KEYS)
        row_alignment: pow2-line    # an integer (rows rounded up to it) or pow2-line (rows of
                                    # at most a cache line padded to a power of two)
        table_alignment: 1          # each table's bytes rounded up to it
        max_row_bytes: {int4: 2048} # optional: longest padded row the kernel takes
        memory: dram                # the tier its tables live in
        whole_input: false          # true: the call reads its features from the whole batch
                                    # (no permute, see permute_us)
        cost:                       # microseconds / nanoseconds on `machine`
          call_us: 10.0             # once per call (group of tables)
          line_ns: 40.0             # per cache line of a row that must come from memory
          out_ns: 0.2               # per pooled value written (bags x dim)
          formats:                  # per format key: per table, per id, per id and row byte
            int4: {table_us: 1.0, id_ns: 5.0, byte_ns: 0.1}
    permute_us: 5.0             # a call that serves only some features picks their ids out
    permute_ns: 1.0             #   of the batch: once per such call, plus per id of the batch
    reorder_ns: 0.5             # with more than one call, the pooled outputs are put back in
                                #   feature order: per output value of the batch
    dense_kernels:              # ways of running one dense layer
      fp32: {w_bits: 32, a_bits: 32, stored_bits: 32, cost: {layer_us: 2.0, mac_ns: 0.02}}
      int8: {w_bits: 8, a_bits: 8, stored_bits: 8, memory: dram, cost: {...}}

Errors name the file and the key and say what would be valid (`HardwareSpecError`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embq.embedding.configs import FormatConfig, parse_format
from embq.errors import ConfigError

SPECS_DIR = Path(__file__).resolve().parent / "specs"
# The hardware view of a format: what the bytes of a row are, whatever search made them.
FORMAT_KEYS = ("fp32", "fp16", "int8", "int4", "int2", "cb4-row", "cb4-shared", "pq")
ROW_ALIGN_POW2_LINE = "pow2-line"
DENSE_BITS = (2, 3, 4, 5, 6, 7, 8, 32)


class HardwareSpecError(ConfigError):
    """A hardware spec that cannot be used: a missing or unknown key, a bad value."""


def format_key(fmt: str | FormatConfig) -> str:
    """The FORMAT_KEYS entry of a format ("int4-opt" -> "int4", "pq8x8(seed=3)" -> "pq")."""
    config = parse_format(fmt)
    kind = config.kind
    if kind in ("float", "rowwise"):
        prefix = "fp" if kind == "float" else "int"
        return f"{prefix}{config.bits}"  # type: ignore[attr-defined]
    return {"row-codebook": "cb4-row", "shared-codebook": "cb4-shared", "pq": "pq"}[kind]


@dataclass(frozen=True)
class MemoryTier:
    """A memory a target keeps tables in: its capacity (bytes) and bandwidth (GB/s)."""

    name: str
    capacity_bytes: int
    bandwidth_gb_s: float


@dataclass(frozen=True)
class FormatCost:
    """What one table of a format costs in a lookup call: table_us once, id_ns + byte_ns *
    (padded row bytes) per id."""

    table_us: float
    id_ns: float
    byte_ns: float


@dataclass(frozen=True)
class LookupKernel:
    """One way of serving a table (see the module docstring for the fields)."""

    name: str
    runtime: str | None
    serves: str
    formats: tuple[str, ...]
    row_alignment: int | str
    table_alignment: int
    memory: str
    call_us: float
    line_ns: float
    costs: dict[str, FormatCost]
    max_row_bytes: dict[str, int]
    whole_input: bool = False
    out_ns: float = 0.0

    def serves_format(self, fmt: str | FormatConfig) -> bool:
        return format_key(fmt) in self.formats


@dataclass(frozen=True)
class DenseKernel:
    """One way of running a dense layer: weight / activation bits, the bits each weight is
    stored with, and its cost (layer_us per layer call, mac_ns per multiply-accumulate)."""

    name: str
    w_bits: int
    a_bits: int
    stored_bits: int
    memory: str
    layer_us: float
    mac_ns: float


@dataclass(frozen=True)
class HardwareSpec:
    """A target: formats and kernels, row and table padding, memory tiers, cost coefficients."""

    name: str
    description: str
    path: str
    machine: dict[str, Any]
    sources: tuple[str, ...]
    qparams_bytes: int
    cache_line: int
    cache_bytes: int
    batch: int
    memory: dict[str, MemoryTier]
    lookup_kernels: dict[str, LookupKernel]
    dense_kernels: dict[str, DenseKernel]
    permute_us: float
    permute_ns: float
    reorder_ns: float = 0.0

    @property
    def formats(self) -> tuple[str, ...]:
        """Every format key some lookup kernel serves, in FORMAT_KEYS order."""
        keys = {f for k in self.lookup_kernels.values() for f in k.formats}
        return tuple(f for f in FORMAT_KEYS if f in keys)

    def kernels_for(self, fmt: str | FormatConfig) -> list[LookupKernel]:
        """The lookup kernels that serve `fmt`, in spec order."""
        return [k for k in self.lookup_kernels.values() if k.serves_format(fmt)]


# --------------------------------------------------------------------------- reading


class _Reader:
    """Typed access to one mapping of the YAML, with errors that name the file and key."""

    def __init__(self, where: str, data: Any, key: str) -> None:
        if not isinstance(data, dict):
            raise HardwareSpecError(f"{where}: {key or 'the spec'} must be a mapping, got "
                                    f"{type(data).__name__}")  # fmt: skip
        self.where, self.data, self.key, self.used = where, data, key, set()

    def _name(self, key: str) -> str:
        if not key:
            return self.key or "the spec"
        return f"{self.key}.{key}" if self.key else key

    def fail(self, key: str, message: str) -> HardwareSpecError:
        return HardwareSpecError(f"{self.where}: {self._name(key)}: {message}")

    def get(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "missing; add it (see embq/hardware/spec.py for the keys)")
            return default
        return self.data[key]

    def sub(self, key: str, default: Any = ...) -> _Reader:
        return _Reader(self.where, self.get(key, default), self._name(key))

    def number(self, key: str, default: Any = ..., low: float = 0.0) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            raise self.fail(key, f"must be a number, got {value!r}")
        if value < low:
            raise self.fail(key, f"must be >= {low:g}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: Any = ..., low: int = 0) -> int:
        value = self.number(key, default, low)
        if value != int(value):
            raise self.fail(key, f"must be a whole number, got {value!r}")
        return int(value)

    def text(self, key: str, default: Any = ...) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"must be text, got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise HardwareSpecError(f"{self.where}: {self.key or 'the spec'} has unknown keys "
                                    f"{unknown}; known: {sorted(self.used)}")  # fmt: skip


def _formats(r: _Reader, key: str) -> tuple[str, ...]:
    value = r.get(key)
    if not isinstance(value, list) or not value:
        raise r.fail(key, f"must be a non-empty list of formats from {list(FORMAT_KEYS)}")
    for f in value:
        if f not in FORMAT_KEYS:
            raise r.fail(key, f"unknown format {f!r}; formats are {list(FORMAT_KEYS)} (a format "
                         "key stands for every search of its bits: int4 covers int4-opt)")  # fmt: skip
    return tuple(value)


def _flag(r: _Reader, key: str) -> bool:
    value = r.get(key, False)
    if not isinstance(value, bool):
        raise r.fail(key, f"must be true or false, got {value!r}")
    return value


def _lookup_kernel(r: _Reader, name: str, tiers: dict[str, MemoryTier]) -> LookupKernel:
    from embq.runtime.kernel_choice import KERNEL_CHOICES

    runtime = r.get("runtime", None)
    if runtime is not None and runtime not in KERNEL_CHOICES:
        raise r.fail("runtime", f"must be one of {KERNEL_CHOICES} (embq's runtime kernel "
                     f"choices) or null, got {runtime!r}")  # fmt: skip
    formats = _formats(r, "formats")
    align = r.get("row_alignment")
    if align != ROW_ALIGN_POW2_LINE:
        align = r.integer("row_alignment", low=1)
    memory = r.text("memory")
    if memory not in tiers:
        raise r.fail("memory", f"names tier {memory!r}; the spec's tiers are {sorted(tiers)}")
    limits = r.sub("max_row_bytes", {})
    max_rows = {}
    for f in list(limits.data):
        if f not in FORMAT_KEYS:
            raise limits.fail(f, f"unknown format; formats are {list(FORMAT_KEYS)}")
        max_rows[f] = limits.integer(f, low=1)
    cost = r.sub("cost")
    per_format = cost.sub("formats")
    costs = {}
    for f in formats:
        if f not in per_format.data:
            raise per_format.fail(f, f"missing: kernel {name!r} serves {f}, so it needs its cost "
                                  "(table_us, id_ns, byte_ns); `embq hardware probe` measures "
                                  "them")  # fmt: skip
        c = per_format.sub(f)
        costs[f] = FormatCost(c.number("table_us"), c.number("id_ns"), c.number("byte_ns"))
        c.done()
    extra = sorted(set(per_format.data) - set(formats))
    if extra:
        raise per_format.fail(str(extra), f"costs formats the kernel does not serve ({list(formats)})")
    kernel = LookupKernel(
        name=name, runtime=runtime, serves=r.text("serves"), formats=formats,
        row_alignment=align, table_alignment=r.integer("table_alignment", 1, low=1),
        memory=memory, call_us=cost.number("call_us"), line_ns=cost.number("line_ns"),
        costs=costs, max_row_bytes=max_rows, whole_input=_flag(r, "whole_input"),
        out_ns=cost.number("out_ns", 0.0),
    )  # fmt: skip
    cost.done()
    r.done()
    return kernel


def _dense_kernel(r: _Reader, name: str, tiers: dict[str, MemoryTier], default_tier: str):
    bits = {}
    for key in ("w_bits", "a_bits", "stored_bits"):
        bits[key] = r.integer(key, low=1)
        if bits[key] not in DENSE_BITS:
            raise r.fail(key, f"must be one of {DENSE_BITS}, got {bits[key]}")
    memory = r.text("memory", default_tier)
    if memory not in tiers:
        raise r.fail("memory", f"names tier {memory!r}; the spec's tiers are {sorted(tiers)}")
    cost = r.sub("cost")
    kernel = DenseKernel(name, bits["w_bits"], bits["a_bits"], bits["stored_bits"], memory,
                         cost.number("layer_us"), cost.number("mac_ns"))  # fmt: skip
    cost.done()
    r.done()
    return kernel


def parse_spec(data: Any, where: str = "<spec>") -> HardwareSpec:
    """A HardwareSpec from parsed YAML (a dict); `where` names it in errors.

    Raises:
        HardwareSpecError: a missing or unknown key, an unknown format, a negative capacity or
            cost, a tier or runtime choice that does not exist, a format without a cost, no
            lookup kernel at all.
    """
    r = _Reader(where, data, "")
    name = r.text("name")
    tiers = {}
    memory = r.sub("memory")
    if not memory.data:
        raise memory.fail("", "needs at least one tier, e.g. dram: {capacity_bytes: ..., "
                          "bandwidth_gb_s: ...}")  # fmt: skip
    for tier in list(memory.data):
        t = memory.sub(tier)
        tiers[tier] = MemoryTier(tier, t.integer("capacity_bytes"), t.number("bandwidth_gb_s"))
        t.done()
    lookups = r.sub("lookup_kernels")
    if not lookups.data:
        raise lookups.fail("", "needs at least one kernel: a target must serve some format")
    kernels = {k: _lookup_kernel(lookups.sub(k), k, tiers) for k in list(lookups.data)}
    dense = r.sub("dense_kernels", {})
    dense_kernels = {k: _dense_kernel(dense.sub(k), k, tiers, next(iter(tiers)))
                     for k in list(dense.data)}  # fmt: skip
    machine = r.get("machine", {})
    sources = r.get("sources", [])
    if not isinstance(machine, dict):
        raise r.fail("machine", "must be a mapping")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise r.fail("sources", "must be a list of text")
    spec = HardwareSpec(
        name=name, description=r.text("description", ""), path=where, machine=dict(machine),
        sources=tuple(sources), qparams_bytes=r.integer("qparams_bytes", 4),
        cache_line=r.integer("cache_line", 64, low=1), cache_bytes=r.integer("cache_bytes", 0),
        batch=r.integer("batch", 512, low=1), memory=tiers, lookup_kernels=kernels,
        dense_kernels=dense_kernels, permute_us=r.number("permute_us", 0.0),
        permute_ns=r.number("permute_ns", 0.0), reorder_ns=r.number("reorder_ns", 0.0),
    )  # fmt: skip
    r.done()
    return spec


def shipped_specs() -> list[str]:
    """Names of the specs shipped with embq (embq/hardware/specs/*.yaml)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | os.PathLike) -> HardwareSpec:
    """A shipped spec by name ("x86-fbgemm") or a spec file by path.

    Raises:
        HardwareSpecError: an unknown name (the message lists the shipped ones), an unreadable
            file, invalid YAML, or a spec `parse_spec` refuses.
    """
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        shipped = SPECS_DIR / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise HardwareSpecError(f"no hardware spec {str(name_or_path)!r}: give a YAML file or "
                                    f"one of {shipped_specs()}")  # fmt: skip
        path = shipped
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HardwareSpecError(f"cannot read the hardware spec {path}: {e}") from e
    except yaml.YAMLError as e:
        raise HardwareSpecError(f"{path} is not valid YAML: {e}") from e
    return parse_spec(data, str(path))
