"""Typed configs of the dense-tower methods: what the bottom and top MLPs become.

A config parses from and prints to a short spec, `METHOD:wXaY`, optionally followed by method
options in parentheses::

    rtn:w8a8      brecq:w4a8      lapq:w2a8      sparq:w8a4      brecq:w4a8(iters_w=2000)

`parse_dense(str(c)) == c`. This module imports neither numpy nor torch; `embq.dense.quantize`
runs a config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from embq.errors import ConfigError

# The methods `embq.dense.api.METHODS` runs (kept here so that parsing stays torch-free).
DENSE_METHODS = ("rtn", "lapq", "brecq", "multipoint", "sparq")
BITS = (2, 3, 4, 5, 6, 7, 8, 32)

_SPEC_RE = re.compile(r"^([a-z]+):w(\d+)a(\d+)(?:\((.*)\))?$")
_KEY_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


def _value_text(value: Any) -> str:
    """An option value as spec text: JSON, except plain words, which stay bare."""
    if isinstance(value, str) and _KEY_RE.match(value) and value not in ("true", "false", "null"):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def _parse_value(text: str) -> Any:
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word, e.g. first_last=fp32
    return tuple(value) if isinstance(value, list) else value


def _split_options(text: str) -> list[str]:
    """Split "a=1,b=[1,2],c=x" at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


@dataclass(frozen=True, eq=True)
class DenseConfig:
    """One post-training quantization of the dense towers.

    Args:
        method: "rtn", "lapq", "brecq", "multipoint" or "sparq".
        w_bits, a_bits: weight / activation bits (2..8, or 32 for fp32). For SPARQ, a_bits is
            the window width over 8-bit activations.
        options: method options and grid settings as (name, value) pairs, e.g.
            (("iters_w", 2000),); see `embq.dense.quantize`.
    """

    method: str = "rtn"
    w_bits: int = 8
    a_bits: int = 8
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in DENSE_METHODS:
            raise ConfigError(f"The 'method' parameter of DenseConfig must be one of "
                              f"{DENSE_METHODS}. Got {self.method!r} instead.")  # fmt: skip
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in BITS:
                raise ConfigError(f"The {name!r} parameter of DenseConfig must be one of {BITS}. "
                                  f"Got {value!r} instead.")  # fmt: skip
        options = self.options.items() if isinstance(self.options, dict) else self.options
        pairs = []
        for key, value in options:
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise ConfigError(f"dense option names are identifiers, got {key!r}")
            pairs.append((key, tuple(value) if isinstance(value, list) else value))
        object.__setattr__(self, "options", tuple(pairs))

    @property
    def option_dict(self) -> dict[str, Any]:
        """The options as keyword arguments of `embq.dense.quantize`."""
        return dict(self.options)

    def __str__(self) -> str:
        base = f"{self.method}:w{self.w_bits}a{self.a_bits}"
        if not self.options:
            return base
        return base + "(" + ",".join(f"{k}={_value_text(v)}" for k, v in self.options) + ")"


def parse_dense(spec: Any) -> DenseConfig:
    """The config of a spec "METHOD:wXaY[(key=value,...)]", or a DenseConfig unchanged.

    Raises:
        ConfigError: a spec of another shape, an unknown method or bit width.
    """
    if isinstance(spec, DenseConfig):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"a dense spec is a string such as 'brecq:w4a8', got {type(spec).__name__}")
    match = _SPEC_RE.match(spec.strip().lower() if "(" not in spec else spec.strip())
    if not match:
        raise ConfigError(f"a dense spec looks like METHOD:wXaY (e.g. brecq:w4a8), got {spec!r}")
    method, w_bits, a_bits, option_text = match.groups()
    options = []
    for item in _split_options(option_text or ""):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"dense option {item.strip()!r} in {spec!r} is not KEY=VALUE")
        options.append((key.strip(), _parse_value(value)))
    return DenseConfig(method, int(w_bits), int(a_bits), tuple(options))
