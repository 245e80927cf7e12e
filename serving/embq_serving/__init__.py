"""embq's serving plugin: load an embq artifact and answer click probabilities.

Modules, one job each:
    predictor   `Predictor` (artifact -> validated predictions) and the input checks it shares
    http        the FastAPI app and the `embq-serve` command (FastAPI + uvicorn)
    export      TorchScript: checked export, loading with torch + fbgemm_gpu only,
                `ScriptedPredictor` for serving an exported file

Importing the package is cheap (numpy only); torch, fbgemm and FastAPI load on first use.
"""

from embq_serving.predictor import BasePredictor, InputSpec, InvalidInputError, Predictor

__all__ = ["BasePredictor", "InputSpec", "InvalidInputError", "Predictor"]
