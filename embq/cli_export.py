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
import os
import time
from pathlib import Path
from typing import Any

from embq.errors import EmbqError
from embq.kernel_choice import add_kernel_argument

CHECK_BATCH = 64
# The scripted and eager modules run the same kernels in the same order: equal in practice.
CHECK_ATOL = 1e-5


def _random_inputs(model: Any, batch: int, seed: int) -> tuple[Any, Any, Any]:
    """(dense float32 [B, n_dense], values int64 [N], offsets int64 [F*B+1]): B rows with 0..3
    uniform ids per bag, key-major in the model's feature order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, model.dense_in_features, generator=g)
    values, lengths = [], []
    for rows in model.table_rows:
        n = torch.randint(0, 4, (batch,), generator=g)
        values.append(torch.randint(0, rows, (int(n.sum()),), generator=g))
        lengths.append(n)
    lengths_all = torch.cat(lengths)
    offsets = torch.zeros(lengths_all.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths_all, 0)
    return dense, torch.cat(values), offsets


def check_export(
    artifact: str | os.PathLike, scripted_path: str | os.PathLike, seed: int = 0,
    kernel: str = "auto",
) -> float:  # fmt: skip
    """Largest |logit difference| between the exported file and the eager runtime model.

    Raises:
        EmbqError: the difference exceeds CHECK_ATOL (a bug in the export).
    """
    import fbgemm_gpu  # noqa: F401  (the scripted module calls torch.ops.fbgemm.*)
    import torch

    from embq.runtime import load_inference_model

    eager = load_inference_model(artifact, verify=False, kernel=kernel)
    scripted = torch.jit.load(str(scripted_path), map_location="cpu")
    dense, values, offsets = _random_inputs(eager, CHECK_BATCH, seed)
    with torch.inference_mode():
        diff = float(
            (eager.core(dense, values, offsets) - scripted(dense, values, offsets)).abs().max()
        )
    if not diff <= CHECK_ATOL:
        raise EmbqError(
            f"the exported {scripted_path} differs from the eager model by {diff:.3g} in the logits "
            f"(allowed {CHECK_ATOL:g}); this is a bug in the export, please report it"
        )
    return diff


def run(args: argparse.Namespace) -> None:
    """Handler: export, check, then print one JSON line."""
    from embq.runtime import export_torchscript

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
