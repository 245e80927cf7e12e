"""Bounded memory on a large generated file (slow: run with `pytest -m slow`)."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys
sys.path.insert(0, {root!r})
from embq.data.synth import write_synthetic
from embq.data.preprocess import prepare_criteo
write_synthetic({raw!r}, rows={rows}, seed=0, progress=False)
synth_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare_criteo([{raw!r}], {out!r}, progress=False)
print(json.dumps({{"synth_peak_mib": synth_rss / 1024,
                   "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


@pytest.mark.slow
def test_generate_and_prepare_in_bounded_memory(tmp_path):
    from tests.conftest import ROOT

    rows = 2_000_000  # ~490 MB of raw TSV
    code = SCRIPT.format(root=str(ROOT), raw=str(tmp_path / "raw.tsv"), out=str(tmp_path / "p"),
                         rows=rows)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    raw_mib = (tmp_path / "raw.tsv").stat().st_size / 2**20
    assert raw_mib > 400
    assert peaks["synth_peak_mib"] < 600 and peaks["peak_mib"] < 700, peaks
