"""The one exception family users see. Every error a user can cause is an EmbqError subclass whose
message says what was wrong and what to do about it."""


class EmbqError(Exception):
    """Base class of every error embq raises for bad input, files or requests."""


class DataError(EmbqError):
    """Malformed or unreadable input data (raw Criteo lines, prepared arrays, MovieLens files)."""


class FormatError(EmbqError):
    """A table or row that a quantization format cannot represent (NaN/Inf, dims that do not pack,
    qparams that overflow fp16, empty tables)."""


class ArtifactError(EmbqError):
    """An artifact that is truncated, tampered with, of an unknown version or escapes its directory."""


class ConfigError(EmbqError):
    """A model config, plan or CLI argument that cannot be used."""
