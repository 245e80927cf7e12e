"""The probe: its fit recovers known coefficients, a tiny real probe writes a spec that loads,
and the `embq hardware` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from embq.hardware.probe import FitColumns, Settings, run_probe, size_bytes, write_spec
from embq.hardware.spec import SPECS_DIR, load_spec


def test_the_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    cols = FitColumns()
    truth = {"call": 20e-6, "table": 3e-6, "id": 4e-9, "byte": 0.2e-9}
    for _ in range(40):
        t, n, b = int(rng.integers(1, 9)), int(rng.integers(64, 4096)), int(rng.choice([8, 16, 64]))
        terms = {"call": 1.0, "table": t, "id": t * n, "byte": t * n * b}
        seconds = sum(truth[k] * v for k, v in terms.items()) * rng.uniform(0.98, 1.02)
        cols.add(terms, seconds)
    coef, error = cols.fit()
    for k, v in truth.items():
        assert coef[k] == pytest.approx(v, rel=0.1), k
    assert error < 0.02 and min(coef.values()) >= 0


def test_cache_sizes_from_lscpu():
    assert size_bytes("32 MiB (1 instance)") == 32 << 20
    assert size_bytes("2 MiB (2 instances)") == 4 << 20
    assert size_bytes("512 KiB") == 512 << 10 and size_bytes("") == 0


def test_a_tiny_probe_writes_a_spec_that_loads(tmp_path):
    base = yaml.safe_load((SPECS_DIR / "x86-fbgemm.yaml").read_text())
    base["lookup_kernels"] = {"tbe": base["lookup_kernels"]["tbe"]}
    base["lookup_kernels"]["tbe"]["formats"] = ["int8", "int4"]
    base["lookup_kernels"]["tbe"]["cost"]["formats"] = {
        k: v for k, v in base["lookup_kernels"]["tbe"]["cost"]["formats"].items() if k in ("int8", "int4")}  # fmt: skip
    base["dense_kernels"] = {"fp32": base["dense_kernels"]["fp32"]}
    write_spec(base, tmp_path / "base.yaml", header="test base")
    settings = Settings(tables=(1, 3), ids=(64, 256), dims=(16,), min_calls=3, min_seconds=0.0,
                        big_bytes=2 << 20)  # fmt: skip
    import embq.hardware.probe as probe

    original = probe.Settings.quick
    probe.Settings.quick = classmethod(lambda cls: settings)  # the smallest probe there is
    try:
        data = run_probe(tmp_path / "base.yaml", quick=True, name="tiny", progress=False)
    finally:
        probe.Settings.quick = original
    out = write_spec(data, tmp_path / "tiny.yaml")
    spec = load_spec(out)
    assert spec.name == "tiny" and spec.machine["measured"] is True and spec.machine["cpu"]
    costs = spec.lookup_kernels["tbe"].costs
    assert set(costs) == {"int8", "int4"}
    # a table of int4 rows at 512 ids costs something positive and below a millisecond
    per_table = costs["int4"].table_us * 1e-6 + 512 * 1e-9 * (costs["int4"].id_ns + 12 * costs["int4"].byte_ns)
    assert 0 < per_table + spec.lookup_kernels["tbe"].call_us * 1e-6 < 1e-3
    assert out.read_text().startswith("# written by `embq hardware probe`")


def test_hardware_commands(capsys):
    from embq.cli import main

    assert main(["hardware", "list"]) == 0
    listed = capsys.readouterr().out
    assert "x86-fbgemm" in listed and "nvidia-fbgemm" in listed
    assert main(["hardware", "show", "nvidia-fbgemm", "--dim", "16"]) == 0
    shown = capsys.readouterr().out
    assert "int4 16 B (0.250)" in shown and "int2 16 B (0.250)" in shown
    assert main(["hardware", "show", "no-such-target"]) == 2
    json.dumps(load_spec("arm").machine)
