import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Two cores: keep torch from oversubscribing when tests run beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# torch and faiss each bundle OpenMP: passive idle threads keep them from starving each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def synth_prepared(tmp_path_factory):
    """A small synthetic Criteo-format dataset, prepared (shared by the slower tests)."""
    from embq.data.preprocess import prepare_criteo
    from embq.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    raw = write_synthetic(root / "raw.tsv", rows=120_000, seed=3, progress=False)
    prepare_criteo([raw], root / "prepared", table_size=20_000, progress=False)
    return root / "prepared"
