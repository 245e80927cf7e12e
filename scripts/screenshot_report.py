"""Render a report (report.html) in headless Chromium and save a screenshot, to see that it
displays in a real browser: tables, and the inline SVG plots.

    python scripts/screenshot_report.py runs/demo/report/report.html --output report.png

Needs Debian's `chromium` (`apt-get install chromium`); prints one JSON line: the screenshot,
its size, and how much of it is not background (a blank page is an error).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# the flags a sandbox-less, network-less machine needs (no first-run UI, no background fetches)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]  # fmt: skip


def screenshot(html: Path, output: Path, width: int = 1280, height: int = 6000) -> Path:
    """Screenshot `html` with headless Chromium into `output` (PNG). RuntimeError if Chromium is
    missing, fails, or the page comes out blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={output.resolve()}",
               html.resolve().as_uri()]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not output.exists():
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-500:]}")
    if _ink(output) < 0.01:
        raise RuntimeError(f"{output} is blank: the page did not render")
    return output


def _ink(png: Path) -> float:
    """Share of pixels that are not the page's white background."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"))
    return float((pixels < 245).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path)
    parser.add_argument("--output", type=Path, default=Path("report.png"))
    args = parser.parse_args()
    shot = screenshot(args.html, args.output)
    from PIL import Image

    print(json.dumps({"screenshot": str(shot), "size": list(Image.open(shot).size),
                      "ink_share": round(_ink(shot), 4)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
