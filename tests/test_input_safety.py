"""Issue 13, part 1: no input reaches a lookup kernel unchecked.

The kernels run with their bounds checks off and trust `offsets`: before the one shared check
(`embq.runtime.validate`), an inner offset of -10^9 crashed the process, negative or
past-the-end offsets read outside `values`, and decreasing offsets or offsets[0] != 0 returned
logits silently. The attacks run in a child process (tests/input_attacks.py) against the eager
core, the eager model with a KeyedJaggedTensor (keys in order and reordered), the module
exported by `embq export` loaded back with torch.jit.load, and the Predictor; each must be
refused with a DataError naming what is wrong. HTTP requests carry bags, not offsets: its id
and dense attacks are in tests/test_http.py (BAD_REQUESTS), and a request's bags always build
well-formed offsets (tested here through the Predictor's `prepare`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embq.errors import DataError
from tests.test_serving import FEATURES, N_DENSE, ROWS, make_artifact, make_model_dir

ATTACKS = Path(__file__).with_name("input_attacks.py")
# cat_0 on ATen's n-bit op ("compact") or the TBE, cat_1 on the codebook bags, cat_2 on the TBE:
# every kernel, and (with kernel "compact") a permutation of the input between them
MIXED_PLAN = json.dumps({"t_cat_0": "int4", "t_cat_1": "cb4-shared", "t_cat_2": "int8"})
EXPECTED = {
    "inner offset -10^9": r"Expected non-decreasing offsets, but got offsets\[5\] = -1000000000",
    "negative offset": r"Expected non-decreasing offsets, but got offsets\[3\] = -3",
    "past-the-end inner offset": r"Expected non-decreasing offsets, but got offsets\[6\] = 12 "
    r"after offsets\[5\] = 1000000",
    "past-the-end last offset": r"Expected offsets\[-1\] == the number of ids \(24\), but got 31",
    "decreasing offsets": r"Expected non-decreasing offsets, but got offsets\[4\] = 5 after "
    r"offsets\[3\] = 6",
    "offsets[0] != 0": r"Expected offsets\[0\] == 0, but got 1",
    "offsets[-1] != len(values)": r"Expected offsets\[-1\] == the number of ids \(24\), but got 23",
    "offsets one short": r"offsets of length F \* B \+ 1 for F = 3 features.*but got 12"
    r"|exactly B=4 bags|stride \(batch size\) 4, but got 3",
    "no offsets": r"offsets of length F \* B \+ 1.*but got 0|exactly B=4 bags|stride",
    "2-D offsets": r"offsets as a 1-D int64 or int32 tensor, but got int64 values of shape "
    r"\[1, 13\]",
    "float ids": r"Expected values \(the ids\) as a 1-D int64 or int32 tensor, but got "
    r"floating-point values of shape \[24\]",
    "negative id": r"feature 'cat_\d' row 1: id -1 not in \[0, \d+\) \(table 't_cat_\d'\)",
    "id one past its table": r"feature 'cat_1' row 0: id 1000 not in \[0, 1000\) "
    r"\(table 't_cat_1'\)",
    "id 2^62": r"id 4611686018427387904 not in \[0, \d+\)",
    "NaN dense": r"finite float32.*\[1\]\[2\]",
    "dense rows != B": r"Expected dense of shape \[4, 13\], but got \[5, 13\]|B=5|stride",
    "dense width 12": r"dense of shape \[(4|batch), 13\], but got \[4, 12\]|float32 \[B, 13\]",
}  # fmt: skip
ENTRIES = {"eager core", "eager embeddings", "scripted export", "eager KJT",
           "eager KJT reordered keys", "Predictor KJT"}  # fmt: skip


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The mixed artifact and its TorchScript exports, one per kernel choice."""
    from embq import cli

    root = tmp_path_factory.mktemp("safety")
    artifact = make_artifact(make_model_dir(root / "model"), MIXED_PLAN, root / "mixed.embq")
    exports = {}
    for kernel in ("auto", "compact"):
        exports[kernel] = root / f"mixed-{kernel}.pt"
        argv = ["export", str(artifact), "--torchscript", str(exports[kernel]), "--no-check"]
        assert cli.main([*argv, "--kernel", kernel]) == 0
    return artifact, exports


@pytest.mark.parametrize("kernel", ["auto", "compact"])
def test_hostile_offsets_and_ids_are_refused_by_every_entry_point(kernel, mixed):
    artifact, exports = mixed
    proc = subprocess.run(
        [sys.executable, str(ATTACKS), str(artifact), str(exports[kernel]), kernel],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    # a crash by signal (the -10^9 offset segfaulted before the check) shows up here
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["entry"] for r in results} == ENTRIES
    assert {r["attack"] for r in results} == set(EXPECTED)
    wrong = []
    for r in results:
        expected = EXPECTED[r["attack"]]
        if r["entry"] == "Predictor KJT":  # it reads the KJT's lengths, refused first
            expected += "|KeyedJaggedTensor lengths must be non-negative and sum to its 24 values"
        if r["outcome"] != "refused" or not re.search(expected, r["message"]):
            wrong.append(f"{r['entry']} / {r['attack']}: {r['outcome']} {r['message'][-300:]}")
    assert not wrong, "\n".join(wrong)


def test_a_refusal_never_quotes_memory_outside_the_input(mixed):
    """Before the check, a past-the-end offset made the error message print ids read from
    beyond `values` (heap contents). Every number a refusal names now comes from the input."""
    from embq_serving.predictor import Predictor

    artifact, _ = mixed
    model = Predictor(artifact, kernel="compact").model
    values = torch.tensor([11, 12, 13, 14, 15, 16], dtype=torch.int64)
    for offsets in ([0, 1, 2, 3, 4, 5, 1000], [0, 1, 2, 900, 4, 5, 6], [0, 1, 2, 3, 4, 5, 7]):
        with pytest.raises(DataError) as info:
            model.core(torch.zeros(2, N_DENSE), values, torch.tensor(offsets))
        numbers = {int(n) for n in re.findall(r"-?\d+", str(info.value))}
        allowed = set(offsets) | set(values.tolist()) | set(range(-1, 8)) | {N_DENSE}
        assert numbers <= allowed, (offsets, str(info.value))


def test_bags_from_requests_always_build_well_formed_offsets(mixed):
    """The Predictor (and so HTTP) turns bags into offsets itself; whatever the bag sizes, the
    offsets it hands the model pass the model's check, and the answer is the model's."""
    from embq_serving.predictor import Predictor

    artifact, _ = mixed
    predictor = Predictor(artifact)
    rng = np.random.default_rng(0)
    for batch in (1, 3, 17):
        sparse = {f: [rng.integers(0, n, rng.integers(0, 5)).tolist() for _ in range(batch)]
                  for f, n in zip(FEATURES, ROWS)}  # fmt: skip
        dense = rng.standard_normal((batch, N_DENSE)).astype(np.float32)
        x, values, offsets = predictor.prepare(dense, sparse)
        assert int(offsets[0]) == 0 and int(offsets[-1]) == values.numel()
        assert bool((offsets[1:] >= offsets[:-1]).all()) and offsets.numel() == 3 * batch + 1
        with torch.inference_mode():
            want = torch.sigmoid(predictor.model.core(x, values, offsets)).numpy()
        np.testing.assert_array_equal(predictor.predict(dense, sparse), want)


@pytest.mark.parametrize("kernel", ["auto", "compact"])
def test_non_contiguous_ids_are_read_as_they_are(kernel, mixed, tmp_path):
    """A strided view of ids (valid input) was handed to the TBE / the n-bit op as if it were
    contiguous: it read other ids (and raised from inside fbgemm). The check now passes the
    kernels contiguous int64. Every table int4, so that one kernel takes the input as it is."""
    from embq import cli
    from embq_serving.predictor import Predictor

    artifact = make_artifact(Path(mixed[0]).parent / "model", "int4", tmp_path / "int4.embq")
    exported = tmp_path / "int4.pt"
    argv = ["export", str(artifact), "--torchscript", str(exported), "--no-check"]
    assert cli.main([*argv, "--kernel", kernel]) == 0
    predictor = Predictor(artifact, kernel=kernel)
    dense, sparse = sample_batch_for_safety()
    x, values, offsets = predictor.prepare(dense, sparse)
    strided = torch.stack([values, torch.zeros_like(values)], dim=1)[:, 0]
    assert not strided.is_contiguous()
    scripted = torch.jit.load(str(exported))
    with torch.inference_mode():
        want = predictor.model.core(x, values, offsets)
        torch.testing.assert_close(predictor.model.core(x, strided, offsets), want, atol=0, rtol=0)
        torch.testing.assert_close(scripted(x, strided, offsets), want, atol=0, rtol=0)
        torch.testing.assert_close(
            predictor.model.core(x, values.int(), offsets.int()), want, atol=0, rtol=0
        )


def sample_batch_for_safety():
    from tests.test_serving import sample_batch

    return sample_batch(batch=16, seed=4)


_EBC_ATTACKS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import embq
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tests.test_runtime import _ebc

q = embq.quantize(_ebc([16, 16]), json.loads(sys.argv[2]), progress=False)
for name, values, offsets in (
    ("inner offset -10^9", [1, 2, 3, 4, 5, 6, 7, 8], [0, 2, -10**9, 6, 8]),
    ("inner offset past the end", [1, 2, 3, 4, 5, 6, 7, 8], [0, 2, 4, 10**6, 8]),
    ("id past its table", [1, 10**6, 3, 4, 5, 6, 7, 8], [0, 2, 4, 6, 8]),
):
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor(values),
                            offsets=torch.tensor(offsets))
    try:
        q(kjt)
        outcome = "answered"
    except embq.EmbqError as e:
        outcome = "refused: " + str(e)
    print(json.dumps({"attack": name, "outcome": outcome}), flush=True)
"""


@pytest.mark.parametrize("plan", ["int4", {"*": "int4", "t_f1": "cb4-row"}], ids=["tbe", "mixed"])
def test_a_quantized_ebc_refuses_hostile_kjts(plan):
    """`embq.quantize(ebc, plan)` serves TorchRec's quant EBC (its TBE adjusted bad offsets
    silently) or, with codebooks, a mixed collection whose KJT permutation read outside the ids
    ("free(): invalid pointer"); both now get the one check first."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _EBC_ATTACKS, str(root), json.dumps(plan)],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 3
    for r in results:
        assert r["outcome"].startswith("refused: "), r
    assert "non-decreasing offsets" in results[0]["outcome"]
    assert "id 1000000 not in [0, 300)" in results[2]["outcome"]
