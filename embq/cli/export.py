"""`embq export`: an artifact -> a TorchScript file that runs with only torch + fbgemm_gpu.

Examples:
    embq export runs/demo/int4.embq --torchscript runs/demo/int4.pt

Loading the file elsewhere::

    import torch, fbgemm_gpu  # fbgemm_gpu registers the kernels the module calls
    m = torch.jit.load("runs/demo/int4.pt")
    logits = m(dense, values, offsets)  # see embq.runtime for the input layout

After writing, the file is loaded back and its logits are compared with the eager runtime
model's on a seeded random batch; --no-check skips that.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from embq.runtime.kernel_choice import add_kernel_argument


def run(args: argparse.Namespace) -> None:
    """Handler: export, check, then print one JSON line."""
    from embq.runtime.export import check_export, export_torchscript

    start = time.perf_counter()
    out = Path(export_torchscript(args.artifact, args.torchscript, kernel=args.kernel))
    result: dict[str, Any] = {"output": str(out), "bytes": out.stat().st_size}
    if not args.no_check:
        result["max_abs_logit_diff"] = check_export(args.artifact, out, kernel=args.kernel)
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `export` subcommand (handler in `args.func`)."""
    parser = subparsers.add_parser(
        "export", help="export an artifact as TorchScript (torch + fbgemm_gpu only)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("artifact", help="artifact directory written by `embq quantize` (X.embq)")
    parser.add_argument(
        "--torchscript",
        metavar="OUT.pt",
        required=True,
        help="TorchScript file to write (replaced atomically if it exists)",
    )
    add_kernel_argument(parser)
    parser.add_argument("--no-check", action="store_true",
                        help="skip loading the file back and comparing it with the eager model")  # fmt: skip
    parser.set_defaults(func=run)
