"""embq: post-training compression of recommendation models (DLRM / TorchRec) and their serving.

The public API (everything else is reached through the subpackages)::

    import embq
    qmodel = embq.quantize(model, embq.Plan.parse('{"*": "int4-greedy", "t_cat_0": "int8"}'))
    embq.save(qmodel, "model.embq")             # an artifact: JSON + safetensors, no pickle
    served = embq.load("model.embq")            # fbgemm kernels over the memory-mapped artifact
    embq.quantize_table("big.npy", "int4-opt", "big.embq")    # one table larger than RAM
    embq.quantize_checkpoint("ckpt/", "config.json", "int4", "m.embq")  # a sharded DCP checkpoint
    embq.formats()                              # every format: bytes per row, kernel
    model, config = embq.load_model("runs/demo/model")   # a DLRM saved by `embq train`

Importing embq is cheap: torch, fbgemm and faiss load only when a verb that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from embq.errors import ArtifactError, ConfigError, DataError, EmbqError, FormatError

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "quantize": "embq.api",
    "save": "embq.api",
    "load": "embq.api",
    "quantize_table": "embq.api",
    "quantize_checkpoint": "embq.checkpoint.quantize",
    "formats": "embq.api",
    "report": "embq.reports.api",
    "compare": "embq.reports.api",
    "QuantizedModel": "embq.api",
    "FormatInfo": "embq.api",
    "Plan": "embq.plan",
    "load_model": "embq.models.dlrm",
    "Float": "embq.embedding.configs",
    "Rowwise": "embq.embedding.configs",
    "RowCodebook": "embq.embedding.configs",
    "SharedCodebook": "embq.embedding.configs",
    "PQ": "embq.embedding.configs",
    "parse_format": "embq.embedding.configs",
    "DenseConfig": "embq.dense.configs",
}

__all__ = [
    "ArtifactError", "ConfigError", "DataError", "EmbqError", "FormatError", "__version__",
    *sorted(_LAZY),
]  # fmt: skip

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from embq.api import FormatInfo, QuantizedModel, formats, load, quantize, quantize_table, save
    from embq.checkpoint.quantize import quantize_checkpoint
    from embq.dense.configs import DenseConfig
    from embq.embedding.configs import PQ, Float, RowCodebook, Rowwise, SharedCodebook, parse_format
    from embq.models.dlrm import load_model
    from embq.plan import Plan
    from embq.reports.api import compare, report


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'embq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
