"""TorchScript deployment: export an artifact, check the export, and serve the exported file.

`embq.runtime.export_torchscript` writes the file (the `embq export` command calls it); this
module is the serving side of it:

- `export_checked(artifact, out)` exports and then proves the file answers what the Predictor
  answers, on a seeded random batch (every table, pooling factors 0..3);
- `load_torchscript(path)` loads a file with only torch and fbgemm_gpu (fbgemm_gpu registers the
  kernels the module calls); the same two lines work in a C++-free Python server;
- `ScriptedPredictor(path)` wraps such a file in the Predictor's interface and validation, for
  deployments that ship the .pt file rather than the artifact.

The scripted module: forward(dense float32 [B, n_dense], values int64 [N], offsets int64
[F*B+1]) -> logits float32 [B]; values are key-major in the model's feature order. That order
and the table sizes travel in the file's extra file "embq_metadata.json".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from embq.errors import ArtifactError, EmbqError
from embq_serving.predictor import BasePredictor, InputSpec, Predictor

METADATA_FILE = "embq_metadata.json"  # the name embq.runtime.export_torchscript stores


def load_torchscript(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Load an exported model with torch + fbgemm_gpu only.

    Returns:
        (the scripted module in eval mode, its embq metadata dict).

    Raises:
        ArtifactError: the file is missing, not TorchScript, or lacks the embq metadata.
    """
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*, which the module calls)
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"{path} is not a file; export one with `embq export MODEL.embq --torchscript {path}`"
        )
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"{path} is not a TorchScript file torch can load: {e}") from e
    try:
        metadata = json.loads(extra[METADATA_FILE])
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"{path} carries no valid {METADATA_FILE}; was it written by embq export?"
        ) from e
    return module.eval(), metadata


class ScriptedPredictor(BasePredictor):
    """A TorchScript file from `embq export` with the Predictor's interface and validation.

    Thread-safe like `Predictor` (one lock around the forward). Needs torch, fbgemm_gpu and
    numpy; not embq.runtime.

    Args:
        path: the .pt file.
        num_threads: if given, `torch.set_num_threads(num_threads)` (process-wide).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        import torch

        super().__init__()
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.path = Path(path)
        self._core, self._metadata = load_torchscript(self.path)
        try:
            self.input_spec = InputSpec.from_metadata(self._metadata)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                f"{self.path}: its {METADATA_FILE} does not describe the inputs ({e})"
            ) from e


def random_batch(spec: InputSpec, batch: int = 64, seed: int = 0,
                 max_bag: int = 3) -> tuple[np.ndarray, dict[str, list[list[int]]]]:  # fmt: skip
    """A seeded valid batch: dense float32 [batch, n_dense] ~ N(0, 1), and for every feature
    `batch` bags of 0..max_bag ids drawn uniformly from its table (ids 0 and rows - 1 included,
    so both ends of every table are read)."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((batch, spec.n_dense)).astype(np.float32)
    sparse: dict[str, list[list[int]]] = {}
    for name, rows in zip(spec.feature_names, spec.rows):
        bags = [
            rng.integers(0, rows, size=int(rng.integers(0, max_bag + 1))).tolist()
            for _ in range(batch)
        ]
        bags[0] = [0, rows - 1]
        sparse[name] = bags
    return dense, sparse


def compare(a: BasePredictor, b: BasePredictor, batch: int = 64, seed: int = 0) -> float:
    """Largest |logit difference| of two predictors on the same random batch (`random_batch`)."""
    dense, sparse = random_batch(a.input_spec, batch, seed)
    return float(
        np.max(np.abs(a.logits(dense, sparse).astype(np.float64) - b.logits(dense, sparse)))
    )


def export_checked(artifact: str | os.PathLike | Predictor, out: str | os.PathLike,
                   atol: float = 1e-5, batch: int = 64, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Export `artifact` to TorchScript at `out`, then check the file against the Predictor.

    Args:
        artifact: the artifact directory, or a Predictor already holding it.
        out: the .pt file to write (replaced atomically if it exists).
        atol: the largest |logit difference| accepted. The two run the same kernels in the same
            order, so the difference is 0 in practice; the slack absorbs other thread counts.

    Returns:
        {"output": str(out), "bytes": file size, "max_abs_logit_diff": float}.

    Raises:
        EmbqError if the exported module answers differently.
    """
    from embq.runtime.export import export_torchscript

    predictor = artifact if isinstance(artifact, Predictor) else Predictor(artifact)
    path = export_torchscript(predictor.path, out, kernel=predictor.kernel)
    diff = compare(predictor, ScriptedPredictor(path), batch=batch, seed=seed)
    if not diff <= atol:
        raise EmbqError(
            f"the TorchScript export {path} differs from the Predictor by {diff:.3g} in the logits "
            f"(allowed {atol:g}); this is a bug in the export, please report it"
        )
    return {"output": str(path), "bytes": path.stat().st_size, "max_abs_logit_diff": diff}
