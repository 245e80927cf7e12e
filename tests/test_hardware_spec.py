"""Hardware specs: the shipped ones load, and a bad spec is refused with an error that names the
file, the key and what would be valid."""

from __future__ import annotations

import copy

import pytest
import yaml

from embq.errors import ConfigError, EmbqError
from embq.hardware.spec import (
    SPECS_DIR,
    HardwareSpecError,
    format_key,
    load_spec,
    parse_spec,
    shipped_specs,
)


def test_the_shipped_specs_load():
    names = shipped_specs()
    assert {"x86-fbgemm", "nvidia-fbgemm", "arm", "accelerator"} <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.name == name and spec.lookup_kernels and spec.sources
        for kernel in spec.lookup_kernels.values():
            assert set(kernel.costs) == set(kernel.formats)
    x86 = load_spec("x86-fbgemm")
    assert {k.runtime for k in x86.lookup_kernels.values()} == {"auto", "compact", "tbe"}
    assert x86.machine.get("cpu")  # the probe names the machine its coefficients come from
    assert load_spec(SPECS_DIR / "arm.yaml").name == "arm"  # by path too


def test_format_keys():
    assert format_key("int4-opt") == "int4" and format_key("int2-greedy(ratio=0.3)") == "int2"
    assert format_key("pq8x8(seed=3)") == "pq" and format_key("fp16") == "fp16"
    assert format_key("cb4-shared") == "cb4-shared"


def _x86() -> dict:
    return yaml.safe_load((SPECS_DIR / "x86-fbgemm.yaml").read_text())


def _set(path: str, value):
    def edit(d: dict) -> None:
        *head, last = path.split(".")
        for key in head:
            d = d[key]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize("edit, message", [
    (_set("lookup_kernels.auto.formats", ["int4", "nf4"]), "unknown format 'nf4'"),
    (_set("memory.dram.capacity_bytes", -1), "capacity_bytes: must be >= 0"),
    (_set("lookup_kernels.compact.cost.formats.int2", _DELETE), "int2: missing: kernel 'compact'"),
    (_set("lookup_kernels", {}), "needs at least one kernel"),
    (_set("lookup_kernels.auto.memory", "hbm"), "names tier 'hbm'"),
    (_set("lookup_kernels.auto.runtime", "fast"), "runtime: must be one of"),
    (_set("lookup_kernels.auto.row_alignment", 0), "row_alignment: must be >= 1"),
    (_set("lookup_kernels.auto.cost.line_ns", "fast"), "line_ns: must be a number"),
    (_set("lookup_kernels.tbe.colour", "red"), "unknown keys \\['colour'\\]"),
    (_set("name", _DELETE), "name: missing"),
    (_set("dense_kernels.int8.w_bits", 9), "w_bits: must be one of"),
    (_set("memory", {}), "needs at least one tier"),
])  # fmt: skip
def test_bad_specs_are_refused_naming_the_key(edit, message):
    data = copy.deepcopy(_x86())
    edit(data)
    with pytest.raises(HardwareSpecError, match=message) as info:
        parse_spec(data, "my-cpu.yaml")
    assert str(info.value).startswith("my-cpu.yaml: ")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, EmbqError)


def test_bad_files(tmp_path):
    with pytest.raises(HardwareSpecError, match="x86-fbgemm"):
        load_spec("no-such-target")  # the message lists the shipped specs
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(HardwareSpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(HardwareSpecError, match="must be a mapping"):
        load_spec(bad)
