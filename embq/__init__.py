"""embq: post-training compression of recommendation models (DLRM / TorchRec) and their serving.

Importing embq is cheap: heavy modules (torch, torchrec, fbgemm, faiss) load only in the
submodules that need them.
"""

from embq.errors import ArtifactError, ConfigError, DataError, EmbqError, FormatError

__version__ = "0.1.0"

__all__ = ["EmbqError", "DataError", "FormatError", "ArtifactError", "ConfigError", "__version__"]
