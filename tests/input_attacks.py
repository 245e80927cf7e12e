"""Hostile sparse / dense inputs against every entry point of a served model, run in a child
process by tests/test_input_safety.py (a kernel reading outside its input can crash the process,
so the parent only reads what this prints).

    python tests/input_attacks.py ARTIFACT EXPORTED.pt KERNEL

prints one JSON line per (entry point, attack): {"entry", "attack", "outcome": "refused" |
"answered" | "error", "type", "message"}. "refused" is an embq DataError (or a scripted
module's torch.jit.Error carrying one); "error" is any other exception.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "serving")]

B = 4  # rows per attack batch
IDS_PER_BAG = 2


def attacks(n_features: int, rows: list[int]) -> dict:
    """name -> (values, offsets, dense) built from a valid batch; every one must be refused."""
    import torch

    n = n_features * B * IDS_PER_BAG
    good_values = torch.cat(
        [torch.arange(B * IDS_PER_BAG, dtype=torch.int64) % r for r in rows]
    )
    good_offsets = torch.arange(0, n + 1, IDS_PER_BAG, dtype=torch.int64)
    dense = torch.zeros(B, 13)

    def with_offset(i: int, value: int):
        off = good_offsets.clone()
        off[i] = value
        return good_values, off, dense

    values_neg = good_values.clone()
    values_neg[3] = -1
    values_big = good_values.clone()
    values_big[B * IDS_PER_BAG + 1] = rows[1]  # feature 1's second id: one past its table
    nan_dense = dense.clone()
    nan_dense[1, 2] = float("nan")
    return {
        "inner offset -10^9": with_offset(5, -(10**9)),
        "negative offset": with_offset(3, -3),
        "past-the-end inner offset": with_offset(5, 10**6),
        "past-the-end last offset": with_offset(n_features * B, n + 7),
        "decreasing offsets": with_offset(4, 5),
        "offsets[0] != 0": with_offset(0, 1),
        "offsets[-1] != len(values)": with_offset(n_features * B, n - 1),
        "offsets one short": (good_values, good_offsets[:-1], dense),
        "no offsets": (good_values, good_offsets[:0], dense),
        "2-D offsets": (good_values, good_offsets.reshape(1, -1), dense),
        "float ids": (good_values.float(), good_offsets, dense),
        "negative id": (values_neg, good_offsets, dense),
        "id one past its table": (values_big, good_offsets, dense),
        "id 2^62": (torch.full_like(good_values, 2**62), good_offsets, dense),
        "NaN dense": (good_values, good_offsets, nan_dense),
        "dense rows != B": (good_values, good_offsets, torch.zeros(B + 1, 13)),
        "dense width 12": (good_values, good_offsets, torch.zeros(B, 12)),
    }


def outcome(fn) -> dict:
    import torch

    from embq.errors import DataError

    mark = "embq.errors.DataError: "  # how a scripted module's DataError reads
    try:
        fn()
    except DataError as e:
        return {"outcome": "refused", "type": type(e).__name__, "message": str(e)}
    except (torch.jit.Error, RuntimeError) as e:
        text = str(e)
        if mark in text:
            message = text[text.rfind(mark) + len(mark) :].strip()
            return {"outcome": "refused", "type": type(e).__name__, "message": message}
        return {"outcome": "error", "type": type(e).__name__, "message": text[-500:]}
    except Exception as e:  # noqa: BLE001  (reported, and the parent fails on it)
        return {"outcome": "error", "type": type(e).__name__, "message": str(e)[-500:]}
    return {"outcome": "answered", "type": "", "message": ""}


def main(artifact: str, exported: str, kernel: str) -> None:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from embq_serving.predictor import Predictor

    predictor = Predictor(artifact, kernel=kernel)
    model = predictor.model
    scripted = torch.jit.load(exported)
    spec = predictor.input_spec
    names = list(spec.feature_names)
    entries = {
        "eager core": lambda v, o, d: model.core(d, v, o),
        "eager embeddings": lambda v, o, d: model.core.embeddings(v, o),
        "scripted export": lambda v, o, d: scripted(d, v, o),
        "eager KJT": lambda v, o, d: model(d, KeyedJaggedTensor(keys=names, values=v, offsets=o)),
        # keys in another order: the model reorders the KJT, which must not trust its offsets
        "eager KJT reordered keys": lambda v, o, d: model(
            d, KeyedJaggedTensor(keys=names[::-1], values=v, offsets=o)
        ),
        "Predictor KJT": lambda v, o, d: predictor.predict(
            d, KeyedJaggedTensor(keys=names, values=v, offsets=o)
        ),
    }
    for name, (values, offsets, dense) in attacks(len(names), list(spec.rows)).items():
        for entry, fn in entries.items():
            if entry == "eager embeddings" and "dense" in name:
                continue  # the lookups take no dense input
            if entry.startswith(("eager KJT", "Predictor")) and (
                offsets.dim() != 1 or values.dtype.is_floating_point
            ):
                continue  # a KeyedJaggedTensor cannot be built from these
            try:
                result = outcome(lambda: fn(values, offsets, dense))  # noqa: B023 (called now)
            except Exception as e:  # noqa: BLE001  (building the KJT itself refused it)
                result = {"outcome": "error", "type": type(e).__name__, "message": str(e)}
            print(json.dumps({"entry": entry, "attack": name, **result}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
