"""TorchScript export of an artifact's inference model, checked against the eager model.

Loading the file elsewhere needs only torch and fbgemm_gpu::

    import torch, fbgemm_gpu  # fbgemm_gpu registers the kernels the module calls
    m = torch.jit.load("model.pt")
    logits = m(dense, values, offsets)  # float32 [B]; see embq.runtime for the input layout
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from embq.errors import EmbqError
from embq.files import staged_file
from embq.runtime.load import load_inference_model

METADATA_FILE = "embq_metadata.json"  # extra file inside exported TorchScript archives


def export_torchscript(
    artifact_path: str | os.PathLike, out_path: str | os.PathLike, kernel: str | None = None
) -> Path:
    """Script the artifact's inference model and save it (TorchScript, `torch.jit.save`).

    The saved module takes (dense float32 [B, n_dense], values int64 [N], offsets int64
    [F*B+1]) and returns logits float32 [B] (see the module docstring); the tables inside stay
    in their compressed formats. `inference_metadata` is stored as the extra file
    "embq_metadata.json". The file is written to a temporary name and renamed into place.
    `kernel`: as in `load_inference_model`. The module checks its input itself before any
    kernel reads it (`embq.runtime.validate`): malformed offsets, ids outside their table and
    non-finite dense values raise a torch.jit.Error carrying "embq.errors.DataError: ...".

    Returns:
        out_path.
    """
    model = load_inference_model(artifact_path, kernel=kernel)
    scripted = torch.jit.script(model.core)
    out = Path(out_path)
    with staged_file(out) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(model.metadata)})
    return out


CHECK_BATCH = 64
# The scripted and eager modules run the same kernels in the same order: equal in practice.
CHECK_ATOL = 1e-5


def _random_inputs(model: Any, batch: int, seed: int) -> tuple[Any, Any, Any]:
    """(dense float32 [B, n_dense], values int64 [N], offsets int64 [F*B+1]): B rows with 0..3
    uniform ids per bag, key-major in the model's feature order."""
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
    kernel: str | None = None,
) -> float:  # fmt: skip
    """Largest |logit difference| between the exported file and the eager runtime model.

    Raises:
        EmbqError: the difference exceeds CHECK_ATOL (a bug in the export).
    """
    import fbgemm_gpu  # noqa: F401  (the scripted module calls torch.ops.fbgemm.*)

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
