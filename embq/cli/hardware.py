"""`embq hardware`: the hardware specs the plan search uses.

Examples:
    embq hardware list
    embq hardware show nvidia-fbgemm --dim 16
    embq hardware probe --output my-cpu.yaml              # measure this machine (~2 min)
    embq hardware probe --quick --base arm --output arm-box.yaml
"""

from __future__ import annotations

import argparse
import json


def run_list(args: argparse.Namespace) -> None:
    from embq.hardware.spec import load_spec, shipped_specs

    for name in shipped_specs():
        spec = load_spec(name)
        print(f"{name:16s} {', '.join(spec.formats):50s} {spec.description[:60]}")


def describe(spec, dim: int) -> list[str]:
    """Lines describing a spec: tiers, then each kernel's formats with their padded rows."""
    from embq.hardware.accounting import padded_row_bytes
    from embq.hardware.spec import format_key

    examples = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int4", "int2": "int2",
                "cb4-row": "cb4-row", "cb4-shared": "cb4-shared", "pq": f"pq{max(1, dim // 4)}x8"}  # fmt: skip
    lines = [f"{spec.name}: {spec.description}", f"  from: {spec.path}"]
    for key, value in spec.machine.items():
        lines.append(f"  machine {key}: {value}")
    for tier in spec.memory.values():
        lines.append(f"  memory {tier.name}: {tier.capacity_bytes:,} bytes, "
                     f"{tier.bandwidth_gb_s:g} GB/s")  # fmt: skip
    fp32 = dim * 4
    for kernel in spec.lookup_kernels.values():
        rows = []
        for key in kernel.formats:
            fmt = examples[key]
            try:
                b = padded_row_bytes(spec, kernel, fmt, dim)
            except Exception:  # a format that does not store rows of this dim
                continue
            rows.append(f"{format_key(fmt)} {b} B ({b / fp32:.3f})")
        lines.append(f"  kernel {kernel.name} (runtime {kernel.runtime}, {kernel.serves}, "
                     f"{kernel.memory}): rows at dim {dim}: " + ", ".join(rows))  # fmt: skip
    for d in spec.dense_kernels.values():
        lines.append(f"  dense {d.name}: w{d.w_bits}a{d.a_bits}, stored at {d.stored_bits} bits")
    return lines


def run_show(args: argparse.Namespace) -> None:
    from embq.hardware.spec import load_spec

    print("\n".join(describe(load_spec(args.name), args.dim)))


def run_probe(args: argparse.Namespace) -> None:
    from embq.hardware.probe import run_probe as probe
    from embq.hardware.probe import write_spec

    data = probe(args.base, threads=args.threads, quick=args.quick, name=args.name,
                 progress=not args.quiet)  # fmt: skip
    out = write_spec(data, args.output)
    print(json.dumps({"output": str(out), "machine": data["machine"]["cpu"],
                      "probe": data["machine"]["probe"]}))  # fmt: skip


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Register `hardware list`, `hardware show` and `hardware probe`."""
    hw = verbs.add_parser("hardware", help="hardware specs: list, show, probe this machine",
                          description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          ).add_subparsers(dest="hardware_verb", required=True)  # fmt: skip
    listing = hw.add_parser("list", help="the shipped specs")
    listing.set_defaults(func=run_list)
    show = hw.add_parser("show", help="a spec's tiers, kernels and padded row sizes")
    show.add_argument("name", help="a shipped spec (embq hardware list) or a YAML file")
    show.add_argument("--dim", type=int, default=16, help="row width to show row sizes at")
    show.set_defaults(func=run_show)
    probe = hw.add_parser("probe", help="measure this machine's lookup and GEMM costs")
    probe.add_argument("--output", required=True, help="spec file to write (YAML)")
    probe.add_argument("--base", default="x86-fbgemm",
                       help="spec whose kernels and formats are probed (default x86-fbgemm)")
    probe.add_argument("--name", help="name of the new spec (default: the base's)")
    probe.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    probe.add_argument("--quick", action="store_true", help="fewer points (~40 s instead of ~2 min)")
    probe.add_argument("--quiet", action="store_true")
    probe.set_defaults(func=run_probe)
