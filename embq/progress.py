"""Progress bars for long steps: tqdm on a terminal, silent when stderr is not one (a log file
stays readable) or when the caller asks for quiet; EMBQ_PROGRESS=1 forces bars on, 0 off."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def progress_enabled(wanted: bool = True) -> bool:
    """Whether a bar should draw: asked for, and stderr is a terminal (or EMBQ_PROGRESS=1)."""
    forced = os.environ.get("EMBQ_PROGRESS", "")
    if forced in ("0", "1"):
        return wanted and forced == "1"
    return wanted and sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar on stderr (`options`: desc, total, unit, unit_scale, initial, ...), disabled
    unless `progress_enabled(enabled)`."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not progress_enabled(enabled), file=sys.stderr, **options)
