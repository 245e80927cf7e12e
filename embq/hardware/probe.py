"""`embq hardware probe`: measure this machine's lookup and dense-layer costs with short
micro-benchmarks of embq's own runtime, fit the spec's cost coefficients, write a spec.

What is timed is what serves a plan: `build_embedding_bags` modules (fbgemm TBE, ATen n-bit,
codebook bags) on synthetic tables, one torch thread unless told otherwise, medians of many
calls. Coefficients are fitted by non-negative least squares on the model of `embq.hardware.
cost` (a call, per table, per id, per row byte, per cache line read from memory; a permute per
call that picks its features out of the batch), each (kernel, format) on its own columns.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embq.hardware.spec import HardwareSpec, load_spec

SMALL_ROWS = 2000  # rows of the in-cache tables
TINY_ROWS = 4  # the first probe table is this small, as real models have tiny tables: ids of
# the others then exceed it and the runtime's range check takes its per-feature path
PROBE_FORMATS = {  # format key -> (format name at dim 16, at dim 64)
    "fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "int8": ("int8", "int8"),
    "int4": ("int4", "int4"), "int2": ("int2", "int2"), "cb4-row": ("cb4-row", "cb4-row"),
    "cb4-shared": ("cb4-shared(sample_rows=2000)", "cb4-shared(sample_rows=2000)"),
    "pq": ("pq4x8(sample_rows=2000)", "pq16x8(sample_rows=2000)"),
}  # fmt: skip


@dataclass
class Settings:
    """How long the probe runs: table counts, ids per table, dims, timed calls."""

    tables: tuple[int, ...] = (2, 10, 26)  # 26: a DLRM's count, where plans are priced
    ids: tuple[int, ...] = (256, 2048)
    dims: tuple[int, ...] = (16, 64)
    min_calls: int = 15
    min_seconds: float = 0.08
    big_bytes: int | None = None  # the out-of-cache table (default: 4 x the last-level cache)
    clock: str = "cpu"  # `embq.hardware.timing`: the thread's CPU time (one thread) or "wall"

    @classmethod
    def quick(cls) -> Settings:
        return cls(tables=(2, 26), ids=(256, 1024), min_calls=8, min_seconds=0.03)


# --------------------------------------------------------------------------- the machine


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def size_bytes(text: str) -> int:
    """'32 MiB (1 instance)' -> 33554432 (every instance counted)."""
    m = re.match(r"([\d.]+)\s*([KMG])i?B(?:\s*\((\d+) instances?\))?", text or "")
    if not m:
        return 0
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
    return int(float(m.group(1)) * scale) * int(m.group(3) or 1)


def machine_info(threads: int) -> dict[str, Any]:
    """The machine as lscpu and /proc/meminfo describe it, plus the software probed."""
    import torch

    cpu = _lscpu()
    cores = int(cpu.get("Core(s) per socket", "0") or 0) * int(cpu.get("Socket(s)", "1") or 1)
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        from importlib.metadata import version

        fbgemm = version("fbgemm-gpu-cpu")
    except Exception:  # not installed under that name
        fbgemm = "unknown"
    return {
        "cpu": f"{cpu.get('Model name', platform.processor() or 'unknown')}, "
               f"{cores or os.cpu_count()} cores, L2 {cpu.get('L2 cache', '?')}, "
               f"L3 {cpu.get('L3 cache', '?')} (lscpu)",
        "architecture": cpu.get("Architecture", platform.machine()),
        "threads": threads,
        "memory_bytes": mem,
        "l3_bytes": size_bytes(cpu.get("L3 cache", "")),
        "software": f"torch {torch.__version__}, fbgemm-gpu-cpu {fbgemm}",
    }  # fmt: skip


def memory_bandwidth_gb_s(nbytes: int = 256 << 20) -> float:
    """Copy bandwidth (read + write) of a large array, best of three, GB/s."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return round(2 * nbytes / best / 1e9, 1)


# --------------------------------------------------------------------------- synthetic tables


def small_table(fmt: str, rows: int, dim: int, seed: int):
    """A real encoded table of `rows` random trained-like rows (~N(0, 0.05^2))."""
    import torch

    from embq.embedding.encode import encode_table
    from embq.models.tables import TableInfo

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=g) * 0.05
    return encode_table(TableInfo(f"t{seed}", rows, dim, [f"f{seed}"], "SUM", weight), fmt)


def big_table(fmt: str, rows: int, dim: int, seed: int):
    """A table of `rows` rows with random codes (and valid qparams), built without encoding:
    only its size and layout matter to a lookup's speed."""
    from embq.artifact.schema import QuantizedTable
    from embq.embedding.configs import parse_format
    from embq.embedding.registry import get_format

    config = parse_format(fmt)
    codec = get_format(config)
    width = codec.bytes_per_row(dim)
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    if config.kind == "float":
        codes = (rng.standard_normal((rows, dim), dtype=np.float32) * 0.05).astype(
            "<f4" if config.bits == 32 else "<f2").view(np.uint8)  # type: ignore[attr-defined]
    else:
        codes = rng.integers(0, 256, (rows, width), dtype=np.uint8)
        if config.kind == "rowwise":  # fp16 scale 0.01, bias -0.05: no NaN or denormal
            codes[:, -4:] = np.array([0.01, -0.05], dtype="<f2").view(np.uint8)
        elif config.kind == "pq":
            k = 1 << config.bits  # type: ignore[attr-defined]
            m = config.m  # type: ignore[attr-defined]
            params = {"centroids": rng.standard_normal((m, k, dim // m)).astype(np.float32)}
        else:
            raise ValueError(f"no big-table probe for {fmt}")
    return QuantizedTable(f"big{seed}", rows, dim, [f"big{seed}"], "SUM", str(config),
                          np.ascontiguousarray(codes), params, {"bytes": int(codes.nbytes)})  # fmt: skip


def batch_inputs(table_rows: list[int], ids: int, seed: int, count: int = 4) -> list[tuple]:
    """`count` batches of (values, offsets): one id per bag, `ids` bags per table, uniform."""
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        values = np.concatenate([rng.integers(0, r, ids) for r in table_rows])
        offsets = np.arange(len(values) + 1)
        out.append((torch.from_numpy(values.astype(np.int64)), torch.from_numpy(offsets)))
    return out


def time_module(tables: list, kernel: Any, ids: int, settings: Settings, seed: int) -> float:
    """Median seconds of a lookup module over these tables, `ids` ids per table."""
    from embq.hardware.timing import median_seconds
    from embq.runtime.bags import build_embedding_bags

    module = build_embedding_bags(tables, kernel)
    inputs = batch_inputs([t.rows for t in tables], ids, seed)
    return median_seconds(lambda b: module(*b), inputs, min_calls=settings.min_calls,
                          min_seconds=settings.min_seconds, clock=settings.clock)  # fmt: skip


# --------------------------------------------------------------------------- fitting


class FitColumns:
    """Named columns of a non-negative least-squares fit."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.rows: list[dict[int, float]] = []
        self.y: list[float] = []

    def col(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def add(self, terms: dict[str, float], seconds: float) -> None:
        self.rows.append({self.col(k): v for k, v in terms.items()})
        self.y.append(seconds)

    def fit(self) -> tuple[dict[str, float], float]:
        """(coefficients, median relative error of the fit on its own points)."""
        from scipy.optimize import nnls

        a = np.zeros((len(self.rows), len(self.names)))
        for i, row in enumerate(self.rows):
            for c, v in row.items():
                a[i, c] = v
        y = np.asarray(self.y)
        w = 1.0 / y  # relative errors: small and large timings count alike
        scale = np.abs(a * w[:, None]).max(axis=0)
        scale[scale == 0] = 1.0
        x, _ = nnls(a * w[:, None] / scale, y * w)
        x = x / scale
        rel = np.abs(a @ x - y) / y
        return dict(zip(self.names, x.tolist())), float(np.median(rel))


def _row_bytes(spec: HardwareSpec, kernel_name: str, fmt: str, dim: int) -> int:
    from embq.hardware.accounting import padded_row_bytes

    return padded_row_bytes(spec, spec.lookup_kernels[kernel_name], fmt, dim)


def probe_lookups(spec: HardwareSpec, settings: Settings, progress: bool = True) -> dict:
    """Time every (kernel, format) the spec serves on embq's runtime; fit the coefficients.

    Returns:
        {"kernels": {kernel: {"call_us", "line_ns", "formats": {key: {table_us, id_ns,
         byte_ns}}}}, "permute_us", "permute_ns", "reorder_ns", "fit_median_rel_error", "points"}
    """
    from tqdm import tqdm

    from embq.hardware.accounting import TableChoice, table_bytes
    from embq.hardware.cost import lines_per_row, miss_fraction
    from embq.hardware.timing import interleaved_medians
    from embq.runtime.bags import build_embedding_bags

    kernels = [k for k in spec.lookup_kernels.values() if k.runtime is not None]
    jobs = [(k, f, d, t, n) for k in kernels for f in k.formats for d in settings.dims
            for t in settings.tables for n in settings.ids]  # fmt: skip
    cols = FitColumns()
    cache: dict[tuple, list] = {}
    bar = tqdm(jobs, desc="probe lookups", unit="point", disable=not progress)
    for seed, (k, key, dim, t, n) in enumerate(bar):
        fmt = PROBE_FORMATS[key][settings.dims.index(dim) if len(settings.dims) > 1 else 0]
        if (fmt, dim) not in cache:
            cache[(fmt, dim)] = [small_table(fmt, TINY_ROWS if i == 0 and key != "pq" else SMALL_ROWS,
                                             dim, i) for i in range(max(settings.tables))]  # fmt: skip
        tables = cache[(fmt, dim)][:t]
        seconds = time_module(tables, k.runtime, n, settings, seed)
        b = _row_bytes(spec, k.name, fmt, dim)
        cols.add({f"call/{k.serves}": 1e-6, f"table/{k.name}/{key}": t * 1e-6,
                  f"id/{k.name}/{key}": t * n * 1e-9, f"byte/{k.name}/{key}": t * n * b * 1e-9,
                  f"out/{k.name}": t * n * dim * 1e-9}, seconds)  # fmt: skip
    # two calls that each serve half the tables (int4 rows padded by one kernel, not by the
    # other): every call pays the permute, and the outputs are put back in feature order
    tbe = [k for k in kernels if k.serves == "fbgemm-tbe" and "int4" in k.formats]
    aligned = {str(k.row_alignment) for k in tbe}
    if len(tbe) >= 2 and len(aligned) >= 2:
        a, b = tbe[0], next(k for k in tbe if str(k.row_alignment) != str(tbe[0].row_alignment))
        for dim in settings.dims:
            fmt = PROBE_FORMATS["int4"][settings.dims.index(dim)]
            tables = cache.get((fmt, dim)) or [small_table(fmt, SMALL_ROWS, dim, i)
                                               for i in range(max(settings.tables))]  # fmt: skip
            tables = tables[: max(settings.tables)]
            choice = {t.name: (a if i % 2 == 0 else b).runtime for i, t in enumerate(tables)}
            for n in settings.ids:
                seconds = time_module(tables, choice, n, settings, 7)
                terms = {f"call/{a.serves}": 2e-6, "permute_us": 2e-6,
                         "permute_ns": 2 * len(tables) * n * 1e-9,
                         "reorder_ns": len(tables) * n * dim * 1e-9}  # fmt: skip
                for kk, share in ((a, (len(tables) + 1) // 2), (b, len(tables) // 2)):
                    bb = _row_bytes(spec, kk.name, fmt, dim)
                    for name, value in ((f"table/{kk.name}/int4", share * 1e-6),
                                        (f"id/{kk.name}/int4", share * n * 1e-9),
                                        (f"byte/{kk.name}/int4", share * n * bb * 1e-9),
                                        (f"out/{kk.name}", share * n * dim * 1e-9)):
                        terms[name] = terms.get(name, 0.0) + value  # fmt: skip
                cols.add(terms, seconds)
    coef, fit_error = cols.fit()
    out: dict[str, Any] = {"kernels": {}, "permute_us": round(coef.get("permute_us", 0.0), 3),
                           "permute_ns": round(coef.get("permute_ns", 0.0), 4),
                           "reorder_ns": round(coef.get("reorder_ns", 0.0), 4),
                           "fit_median_rel_error": round(fit_error, 4), "points": len(cols.y)}  # fmt: skip
    for k in kernels:
        out["kernels"][k.name] = {
            "call_us": round(coef.get(f"call/{k.serves}", 0.0), 3),
            "line_ns": 0.0,
            "out_ns": round(coef.get(f"out/{k.name}", 0.0), 4),
            "formats": {key: {"table_us": round(coef.get(f"table/{k.name}/{key}", 0.0), 3),
                              "id_ns": round(coef.get(f"id/{k.name}/{key}", 0.0), 3),
                              "byte_ns": round(coef.get(f"byte/{k.name}/{key}", 0.0), 4)}
                        for key in k.formats},
        }  # fmt: skip
    # per kernel, one table far larger than the cache against a small one, same format, same
    # ids, timed in interleaved rounds: the difference is what its rows' cache lines cost
    # when they come from memory
    big_bytes = settings.big_bytes or max(4 * spec.cache_bytes, 64 << 20)
    big_ids = 8192
    for k in tqdm(kernels, desc="probe memory", unit="kernel", disable=not progress):
        key = "int4" if "int4" in k.formats else ("pq" if "pq" in k.formats else k.formats[0])
        fmt = {"int4": "int4", "pq": "pq16x8"}.get(key, PROBE_FORMATS[key][-1])
        dim = 64
        b = _row_bytes(spec, k.name, fmt, dim)
        big = big_table(fmt, max(1, big_bytes // b), dim, 11)
        small = big_table(fmt, SMALL_ROWS, dim, 12)
        fns = {}
        for name, table in (("big", big), ("small", small)):
            module = build_embedding_bags([table], k.runtime)
            batches = batch_inputs([table.rows], big_ids, 13)
            fns[name] = lambda i, m=module, bs=batches: m(*bs[i % len(bs)])
        medians = interleaved_medians(fns, list(range(8)), rounds=3, min_calls=settings.min_calls,
                                      min_seconds=settings.min_seconds)  # fmt: skip
        seconds = {name: m[settings.clock] for name, m in medians.items()}
        choice = TableChoice(fmt, k.name, k.runtime, k.memory, b,
                             table_bytes(spec, k, fmt, big.rows, dim), "")  # fmt: skip
        lines = lines_per_row(spec, choice) * miss_fraction(spec, choice.bytes, 1)
        extra = max(0.0, seconds["big"] - seconds["small"])
        # a "big" table that fits the cache says nothing about memory: keep the base's figure
        line_ns = extra / (big_ids * lines) * 1e9 if lines > 0 else k.line_ns
        out["kernels"][k.name]["line_ns"] = round(line_ns, 2)
        del big
    return out


def probe_dense(spec: HardwareSpec, settings: Settings, progress: bool = True) -> dict:
    """Time the dense kernels embq's runtime runs (fp32 Linear; torch's dynamic int8 Linear on
    fbgemm for w8a8; weight-only low bits run as fp32 with dequantized weights) over a few
    layer shapes and batches; fit layer_us and mac_ns per kernel."""
    import torch
    from tqdm import tqdm

    from embq.hardware.timing import median_seconds

    shapes = [(13, 64), (64, 16), (367, 64), (64, 32), (256, 256), (512, 512)]
    batches = (128, 512, 2048)
    out = {}
    for name, k in tqdm(spec.dense_kernels.items(), desc="probe dense", disable=not progress):
        if k.w_bits == 8 and k.a_bits == 8:
            kind = "int8"
        elif k.a_bits == 32:
            kind = "fp32"  # fp32, or low-bit weights served dequantized
        else:
            continue  # a kernel embq's runtime does not run here: keep the base coefficients
        cols = FitColumns()
        for i, o in shapes:
            layer = torch.nn.Linear(i, o)
            if kind == "int8":
                layer = torch.ao.quantization.quantize_dynamic(
                    torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8)
            for bsz in batches:
                x = [torch.randn(bsz, i) for _ in range(2)]
                seconds = median_seconds(layer, x, min_calls=settings.min_calls,
                                         min_seconds=settings.min_seconds, clock=settings.clock)  # fmt: skip
                cols.add({"layer_us": 1e-6, "mac_ns": bsz * i * o * 1e-9}, seconds)
        coef, err = cols.fit()
        out[name] = {"layer_us": round(coef["layer_us"], 3), "mac_ns": round(coef["mac_ns"], 6),
                     "fit_median_rel_error": round(err, 4)}  # fmt: skip
    return out


def run_probe(base: str | os.PathLike = "x86-fbgemm", threads: int = 1, quick: bool = False,
              name: str | None = None, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Measure this machine and return the spec (as YAML-ready data): the base spec's kernels
    and formats, with this machine's cache, memory and cost coefficients."""
    import torch
    import yaml

    spec = load_spec(base)
    data = yaml.safe_load(Path(spec.path).read_text(encoding="utf-8"))
    settings = Settings.quick() if quick else Settings()
    # one thread runs every kernel on the calling thread: its CPU time is the latency without
    # the time other processes took; with more threads only the wall clock sees all the work
    settings.clock = "cpu" if threads == 1 else "wall"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    began = time.perf_counter()
    try:
        info = machine_info(threads)
        if info["l3_bytes"]:
            data["cache_bytes"] = info["l3_bytes"]
            spec = _with_cache(spec, info["l3_bytes"])
        lookups = probe_lookups(spec, settings, progress)
        dense = probe_dense(spec, settings, progress)
    finally:
        torch.set_num_threads(old_threads)
    tier = spec.lookup_kernels[next(iter(spec.lookup_kernels))].memory
    if info["memory_bytes"]:
        data["memory"][tier]["capacity_bytes"] = info["memory_bytes"]
    data["memory"][tier]["bandwidth_gb_s"] = memory_bandwidth_gb_s()
    for kname, fitted in lookups["kernels"].items():
        data["lookup_kernels"][kname]["cost"] = fitted
    for key in ("permute_us", "permute_ns", "reorder_ns"):
        data[key] = lookups[key]
    for dname, fitted in dense.items():
        data["dense_kernels"][dname]["cost"] = {"layer_us": fitted["layer_us"],
                                                "mac_ns": fitted["mac_ns"]}  # fmt: skip
    data["name"] = name or data["name"]
    data["machine"] = {
        "cpu": info["cpu"], "architecture": info["architecture"], "software": info["software"],
        "threads": threads, "measured": True,
        "probe": f"embq hardware probe{' --quick' if quick else ''} --threads {threads}, "
                 f"{time.strftime('%Y-%m-%d')}, {lookups['points']} lookup points "
                 f"(fit median relative error {lookups['fit_median_rel_error']:.3f}), "
                 f"{time.perf_counter() - began:.0f} s; medians of timed calls, "
                 f"{settings.clock} clock",
        "dense_fit_median_rel_error": {k: v["fit_median_rel_error"] for k, v in dense.items()},
    }  # fmt: skip
    return data


def _with_cache(spec: HardwareSpec, cache_bytes: int) -> HardwareSpec:
    from dataclasses import replace

    return replace(spec, cache_bytes=int(cache_bytes))


def dump_spec(data: dict[str, Any], header: str) -> str:
    """Spec data as YAML text after `header` (comment lines): mappings of numbers and lists of
    short words on one line, the rest in blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def represent_dict(self, value):  # type: ignore[override]
            flow = bool(value) and all(isinstance(v, (int, float)) for v in value.values())
            return self.represent_mapping("tag:yaml.org,2002:map", value, flow_style=flow)

        def represent_list(self, value):  # type: ignore[override]
            flow = all(isinstance(v, str) and len(v) < 16 for v in value)
            return self.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    Dumper.add_representer(dict, Dumper.represent_dict)
    Dumper.add_representer(list, Dumper.represent_list)
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.dump(data, Dumper=Dumper, sort_keys=False, width=100)


def write_spec(data: dict[str, Any], output: str | os.PathLike,
               header: str = "written by `embq hardware probe`; cost coefficients measured on "
                             "the machine below") -> Path:  # fmt: skip
    """Write spec data as YAML (checked by parsing it back first), atomically."""
    from embq.files import staged_file
    from embq.hardware.spec import parse_spec

    parse_spec(data, str(output))
    output = Path(output)
    with staged_file(output) as tmp:
        tmp.write_text(dump_spec(data, header), encoding="utf-8")
    return output
