"""Finding a table format by name: `get_format("int4-greedy")` -> the TableFormat that encodes it.

Names parse to typed configs (`embq.embedding.configs`); each config builds its codec. Codecs
without parameters are built once and shared.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from embq.embedding.configs import FormatConfig, format_families, parse_format
from embq.errors import ConfigError, FormatError


@lru_cache(maxsize=256)
def _codec(config: FormatConfig) -> Any:
    return config.codec()


def get_format(name: str | FormatConfig) -> Any:
    """The `TableFormat` of a format name or config; FormatError for an unknown name (its
    message lists the known ones)."""
    try:
        config = parse_format(name)
    except ConfigError as e:
        raise FormatError(str(e)) from None
    return _codec(config)


def format_names() -> list[str]:
    """Names of the formats; PQ is listed by two examples (any pq<M>x<bits> works)."""
    return format_families()
