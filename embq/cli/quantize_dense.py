"""`embq quantize-dense`: post-training quantization of a trained DLRM's MLP towers.

Example:
    embq quantize-dense --model runs/demo/model --data runs/demo/prepared \\
        --method brecq --w-bits 4 --a-bits 8 --output runs/demo/dense-brecq-w4a8

Calibration uses the last --calib-rows rows of the training split; the held-out split (the last
--valid-fraction of the rows, as in `embq train`) is scored before and after. The quantized
towers are written as dense.safetensors + dense.json (no pickle).
"""

from __future__ import annotations

import argparse
import json

from embq.errors import ConfigError


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"--option takes KEY=VALUE, got {text!r}.")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key.strip().replace("-", "_"), parsed


def _cmd_quantize_dense(args: argparse.Namespace) -> None:
    import torch

    from embq.data.prepared import PreparedData
    from embq.dense import CalibrationCache, quantize, save_quantized
    from embq.dense.core.calibration import logits
    from embq.models.dlrm import load_model
    from embq.models.metrics import click_metrics

    model, _ = load_model(args.model)
    data = PreparedData(args.data)
    (train_start, train_stop), (valid_start, valid_stop) = data.split(args.valid_fraction)
    calib_start = max(train_start, train_stop - args.calib_rows)
    cache = CalibrationCache.from_batches(model, data.batches(calib_start, train_stop, 4096))
    options = dict(_parse_option(o) for o in args.option or [])
    towers = quantize(
        model,
        method=args.method,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        calib=cache,
        calib_rows=None,
        first_last=args.first_last,
        w_per_channel=not args.per_tensor,
        w_symmetric=args.w_symmetric,
        seed=args.seed,
        **options,
    )
    result = {
        "method": args.method,
        "tag": towers.info["tag"],
        "seconds": towers.info["seconds"],
        "calib_rows": len(cache),
    }
    if not args.no_eval:
        held_out = CalibrationCache.from_batches(model, data.batches(valid_start, valid_stop, 8192))
        from embq.dense.core.fakequant import QuantizedDLRMTowers

        for name, t in (("fp32", QuantizedDLRMTowers.from_model(model)), ("quantized", towers)):
            probs = torch.sigmoid(logits(t, held_out)).numpy()
            m = click_metrics(held_out.labels.numpy(), probs)
            result[name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()}
    if args.output:
        result["output"] = str(save_quantized(towers, args.output))
    if not args.quiet:
        for row in towers.info["plan"]["layers"]:
            print(
                f"  {row['name']:9s} {row['in']:5d}->{row['out']:<4d} "
                f"W{row['w_bits']:<2d} {row['w_grid']:24s} "
                f"A{row['a_bits']:<2d} {row['a_grid']}"
            )
    print(json.dumps(result))


def add_parser(subparsers) -> None:
    """Register `quantize-dense` on the `embq` CLI's subparsers."""
    from embq.dense.api import METHODS

    p = subparsers.add_parser(
        "quantize-dense",
        help="post-training quantization of the DLRM's MLP towers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory (embq train output)")
    p.add_argument(
        "--data", required=True, help="prepared dataset directory (calibration and held-out rows)"
    )
    p.add_argument("--method", choices=sorted(METHODS), default="rtn")
    p.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..8 (32 = fp32)")
    p.add_argument(
        "--a-bits",
        type=int,
        default=8,
        help="activation bits, 2..8 (32 = fp32); for sparq, the window bits over 8-bit activations",
    )
    p.add_argument("--output", help="directory to write the quantized towers into (must not exist)")
    p.add_argument(
        "--calib-rows", type=int, default=4096, help="calibration rows (end of the training split)"
    )
    p.add_argument(
        "--valid-fraction", type=float, default=0.1, help="held-out share, as in `embq train`"
    )
    p.add_argument(
        "--first-last",
        choices=["8bit", "same", "fp32"],
        default="8bit",
        help="first bottom layer and logit layer: at 8/8 bits, at the requested bits, or fp32",
    )
    p.add_argument(
        "--per-tensor",
        action="store_true",
        help="one weight scale per tensor (default: per channel)",
    )
    p.add_argument(
        "--w-symmetric", action="store_true", help="symmetric weight grid (default: asymmetric)"
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option, e.g. iters_w=2000 (repeatable; values parsed as JSON)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_quantize_dense)
