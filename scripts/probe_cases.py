"""The tries of scripts/probe_robustness.py for model inputs, artifact edits and data files, and
the child-process runners that make them. HTTP tries are in probe_http.py.

Every runner returns {"outcome": one of OUTCOMES, "detail": str} for one try.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

OUTCOMES = ("clean_refusal", "identical_answer", "silent_wrong", "crash", "traceback",
            "out_of_bounds_read", "starved")  # fmt: skip
LOGIT_TOL = 1e-3  # float32 kernels against the float64 reference, relative to 1 + |logit|
DATA_MARK = "embq.errors.DataError: "


# --------------------------------------------------------------------------- references


def build_small_artifact(out: str) -> None:
    """A small DLRM (8 features, 13 dense, dim 16, trained-like rows), int4-greedy."""
    import torch

    import embq
    from embq.models.dlrm import DLRMConfig, build_dlrm

    features = [f"cat_{i}" for i in range(8)]
    config = DLRMConfig(dense_in_features=13, sparse_feature_names=features,
                        num_embeddings=[50 + 97 * i for i in range(8)], embedding_dim=16,
                        dense_arch=[32, 16], over_arch=[16, 1])  # fmt: skip
    model = build_dlrm(config, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bag in model.sparse_arch.embedding_bag_collection.embedding_bags.values():
            scale = 0.05 + 0.95 * torch.rand(bag.weight.shape[0], 1, generator=g)
            bag.weight.copy_(torch.randn(bag.weight.shape, generator=g) * scale)
    embq.save(embq.quantize(model.eval(), "int4-greedy", progress=False), out)


def reference_batch(meta: dict, batch: int, seed: int) -> tuple[np.ndarray, dict]:
    """A valid batch: dense float32 [B, n_dense], {feature: B bags of 0..3 ids}."""
    rng = np.random.default_rng(seed)
    n_dense = int(meta["inputs"]["dense"]["shape"][1])
    rows = meta["inputs"]["sparse"]["table_rows"]
    dense = rng.standard_normal((batch, n_dense)).astype(np.float32)
    sparse = {f: [rng.integers(0, rows[f], int(rng.integers(0, 4))).tolist() for _ in range(batch)]
              for f in meta["inputs"]["sparse"]["feature_names"]}  # fmt: skip
    return dense, sparse


def float64_logits(artifact: str | os.PathLike, dense: np.ndarray, sparse: dict) -> np.ndarray | None:
    """DLRM logits in float64 from the artifact's decoded tables and float dense tensors
    (None when the towers are not stored in fp32): pooled bags, bottom MLP with ReLUs, pairwise
    dot interaction, top MLP with ReLUs but the last."""
    from safetensors.numpy import load_file

    from embq.artifact.reader import load_artifact

    art = load_artifact(artifact, verify=False)
    if (art.dense_meta or {}).get("kind") != "fp32":
        return None
    model = art.model
    pooled = []
    for f in model["config"]["sparse_feature_names"]:
        name = "t_" + f
        table = art.table(name)
        w = table.decode().astype(np.float64)
        mean = model["pooling"].get(name, "SUM") == "MEAN"
        pooled.append(np.stack([
            (w[bag].mean(0) if mean else w[bag].sum(0)) if len(bag) else np.zeros(w.shape[1])
            for bag in sparse[f]]))  # fmt: skip
    tensors = load_file(str(art.path / art.manifest["dense"]["file"]))

    def layers(prefix: str) -> list:
        def order(key: str) -> list:
            return [int(p) if p.isdigit() else p for p in key.split(".")]

        keys = sorted((k for k in tensors if k.startswith(prefix) and k.endswith(".weight")),
                      key=order)  # fmt: skip
        return [(tensors[k].astype(np.float64), tensors[k[:-6] + "bias"].astype(np.float64))
                for k in keys]  # fmt: skip

    x = dense.astype(np.float64)
    for w, b in layers("dense_arch."):
        x = np.maximum(x @ w.T + b, 0.0)
    combined = np.concatenate([x[:, None, :], np.stack(pooled, axis=1)], axis=1)
    gram = combined @ combined.transpose(0, 2, 1)
    i, j = np.triu_indices(len(pooled) + 1, k=1)
    z = np.concatenate([x, gram[:, i, j]], axis=1)
    top = layers("over_arch.")
    for k, (w, b) in enumerate(top):
        z = z @ w.T + b
        if k < len(top) - 1:
            z = np.maximum(z, 0.0)
    return z.reshape(-1)


# --------------------------------------------------------------------------- model inputs

# name -> (valid, reads outside the ids if answered)
MUTATIONS = {
    "offset -10^9 inside": (False, True), "negative inner offset": (False, True),
    "inner offset past the end": (False, True), "last offset past the end": (False, True),
    "last offset short of the ids": (False, False), "decreasing offsets": (False, True),
    "offsets[0] = 1": (False, True), "offsets[0] negative": (False, True),
    "offsets one short": (False, True), "offsets one long": (False, True),
    "no offsets": (False, True), "2-D offsets": (False, True), "float offsets": (False, True),
    "random offsets": (False, True), "negative id": (False, True), "id == rows": (False, True),
    "id 2^62": (False, True), "id -2^63": (False, True), "float ids": (False, False),
    "bool ids": (False, False), "int16 ids": (False, False), "2-D ids": (False, False),
    "NaN dense": (False, False), "Inf dense": (False, False), "-Inf dense": (False, False),
    "float64 1e39 dense": (False, False), "dense one too wide": (False, False),
    "dense one row more": (False, False), "1-D dense": (False, False),
    "complex dense": (False, False),
    "int32 ids and offsets": (True, False), "float64 dense": (True, False),
    "all bags empty": (True, False), "ids at the table ends": (True, False),
    "batch of 1": (True, False), "integer dense": (True, False),
    "strided ids": (True, False),
}  # fmt: skip
ENTRIES = ["core auto", "core compact", "scripted export", "KJT keys in order",
           "KJT keys reversed", "Predictor KJT"]  # fmt: skip
KJT_SAFE = {"float ids", "bool ids", "int16 ids", "2-D ids", "2-D offsets", "float offsets",
            "no offsets", "complex dense", "1-D dense"}  # inputs a KJT cannot carry  # fmt: skip


def model_cases(seed: int, quick: bool) -> list[dict]:
    cases = []
    repeats = {"random offsets": 4 if quick else 20}
    for mutation in MUTATIONS:
        for entry in ENTRIES:
            if entry.startswith(("KJT", "Predictor")) and mutation in KJT_SAFE:
                continue
            for k in range(repeats.get(mutation, 1)):
                cases.append({"category": "model input", "name": f"{entry} / {mutation}",
                              "entry": entry, "mutation": mutation, "seed": seed * 1000 + k})  # fmt: skip
    return cases


def mutate(name: str, values, offsets, dense, rows: list[int], batch: int, rng):
    """(values, offsets, dense) after mutation `name` (torch tensors)."""
    import torch

    v, o, d = values.clone(), offsets.clone(), dense.clone()
    n, last = v.numel(), o.numel() - 1
    mid = last // 2
    if name == "offset -10^9 inside":
        o[mid] = -(10**9)
    elif name == "negative inner offset":
        o[mid] = -3
    elif name == "inner offset past the end":
        o[mid] = n + 1000
    elif name == "last offset past the end":
        o[-1] = n + 7
    elif name == "last offset short of the ids":
        v = torch.cat([v, torch.zeros(3, dtype=v.dtype)])
    elif name == "decreasing offsets":
        o[mid] = int(o[mid + 1]) + 2 if int(o[mid + 1]) + 2 <= n else n
        o[mid + 1] = max(int(o[mid]) - 3, 0)
    elif name == "offsets[0] = 1":
        o[0] = 1
    elif name == "offsets[0] negative":
        o[0] = -5
    elif name == "offsets one short":
        o = o[:-1]
    elif name == "offsets one long":
        o = torch.cat([o, o[-1:]])
    elif name == "no offsets":
        o = o[:0]
    elif name == "2-D offsets":
        o = o.reshape(1, -1)
    elif name == "float offsets":
        o = o.double()
    elif name == "random offsets":
        o = torch.from_numpy(np.sort(rng.integers(-n, 2 * n + 2, o.numel()))).long()
        o[0], o[-1] = 0, n  # the ends right, the inside not: only the middle can be wrong
        if bool((o[1:] >= o[:-1]).all()) and int(o.min()) >= 0 and int(o.max()) <= n:
            o[mid] = -1  # sorted and inside by chance: make it invalid
    elif name == "negative id":
        v[rng.integers(0, n)] = -1
    elif name == "id == rows":  # the first id of the first feature that has one
        starts = o[::batch].tolist()
        f = next(k for k in range(len(rows)) if starts[k + 1] > starts[k])
        v[starts[f]] = rows[f]
    elif name == "id 2^62":
        v[rng.integers(0, n)] = 2**62
    elif name == "id -2^63":
        v[rng.integers(0, n)] = -(2**63)
    elif name == "float ids":
        v = v.double()
    elif name == "bool ids":
        v = v > 0
    elif name == "int16 ids":
        v = v.to(torch.int16)
    elif name == "2-D ids":
        v = v.reshape(1, -1)
    elif name == "NaN dense":
        d[0, 1] = float("nan")
    elif name == "Inf dense":
        d[1, 0] = float("inf")
    elif name == "-Inf dense":
        d[-1, -1] = float("-inf")
    elif name == "float64 1e39 dense":
        d = d.double()
        d[0, 0] = 1e39
    elif name == "dense one too wide":
        d = torch.cat([d, d[:, :1]], dim=1)
    elif name == "dense one row more":
        d = torch.cat([d, d[:1]])
    elif name == "1-D dense":
        d = d[0]
    elif name == "complex dense":
        d = d.to(torch.complex64)
    elif name == "int32 ids and offsets":
        v, o = v.int(), o.int()
    elif name == "float64 dense":
        d = d.double()
    elif name == "all bags empty":
        v, o = v[:0], torch.zeros_like(o)
    elif name == "ids at the table ends":
        f_rows = np.repeat(rows, np.diff(o[:: batch].numpy()))
        v = torch.from_numpy(np.where(np.arange(n) % 2 == 0, 0, f_rows - 1)).long()
    elif name == "integer dense":
        d = (d * 3).round().long()
    elif name == "strided ids":
        v = torch.stack([v, torch.zeros_like(v)], dim=1)[:, 0]
    return v, o, d


def numbers_quoted_from_outside(message: str, values, offsets, dense, rows: list[int]) -> list[int]:
    """Integers a refusal names that the input does not hold (nor its sizes, positions or the
    tables' rows): a message quoting memory read outside the input."""
    allowed = set(range(-1, max(offsets.numel(), values.numel()) + 2)) | set(rows)
    for t in (values, offsets):
        if not t.is_floating_point() and not t.is_complex() and t.numel():
            allowed |= {int(x) for x in t.reshape(-1).tolist()}
    allowed |= {int(s) for s in list(dense.shape) + list(values.shape) + list(offsets.shape)}
    allowed |= {13, 16, 32, 64, 3, 4, 8, 2, 38, 2**63 - 1}
    found = [int(x) for x in re.findall(r"(?<![\w.\[])-?\d+(?![\w.])", message)]
    return [x for x in found if x not in allowed and abs(x) > 64]


class ModelRunner:
    """Loads the artifact on each entry point once, then runs model-input tries."""

    def __init__(self, context: dict) -> None:
        import torch

        import embq
        from embq_serving.predictor import Predictor

        self.artifact = context["artifact"]
        self.predictor = Predictor(self.artifact)
        self.meta = self.predictor.metadata()
        self.names = list(self.meta["inputs"]["sparse"]["feature_names"])
        table_rows = self.meta["inputs"]["sparse"]["table_rows"]
        self.rows = [int(table_rows[f]) for f in self.names]
        self.cores = {"auto": self.predictor.model.core,
                      "compact": embq.load(self.artifact, kernel="compact").module.core}  # fmt: skip
        exported = Path(context["workdir"]) / "model.pt"
        if not exported.exists():
            from embq.runtime.export import export_torchscript

            export_torchscript(self.artifact, exported)
        self.scripted = torch.jit.load(str(exported))
        self.torch = torch

    def _keys(self, entry: str) -> list[str]:
        return self.names[::-1] if entry == "KJT keys reversed" else self.names

    def _input(self, seed: int, keys: list[str]):
        """A valid batch of 4 rows, key-major in `keys` order."""
        torch = self.torch
        dense, sparse = reference_batch(self.meta, 4, seed)
        lengths = [len(bag) for f in keys for bag in sparse[f]]
        values = torch.tensor([i for f in keys for bag in sparse[f] for i in bag],
                              dtype=torch.int64)  # fmt: skip
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
        return values, offsets, torch.from_numpy(dense)

    def _call(self, entry: str, v, o, d):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        torch = self.torch
        with torch.inference_mode():
            if entry.startswith("core"):
                return self.cores[entry.split()[1]](d, v, o)
            if entry == "scripted export":
                return self.scripted(d, v, o)
            kjt = KeyedJaggedTensor(keys=self._keys(entry), values=v, offsets=o)
            if entry == "Predictor KJT":
                return torch.from_numpy(self.predictor.logits(d.numpy(), kjt))
            return self.predictor.model(d, kjt)

    def _reference(self, entry: str, v, o, d) -> np.ndarray | None:
        keys = self._keys(entry)
        batch = (o.numel() - 1) // len(keys)
        vals, offs = v.long().numpy(), o.long().numpy()
        sparse = {k: [vals[offs[i * batch + b]: offs[i * batch + b + 1]].tolist()
                      for b in range(batch)] for i, k in enumerate(keys)}  # fmt: skip
        return float64_logits(self.artifact, d.double().numpy(), sparse)

    def run(self, case: dict) -> dict:
        from embq.errors import DataError, EmbqError

        rng = np.random.default_rng(case["seed"])
        keys = self._keys(case["entry"])
        rows = [self.rows[self.names.index(k)] for k in keys]
        values, offsets, dense = self._input(case["seed"], keys)
        if case["mutation"] == "batch of 1":
            values, offsets, dense = _first_row(values, offsets, dense, len(keys))
        valid, oob = MUTATIONS[case["mutation"]]
        v, o, d = mutate(case["mutation"], values, offsets, dense, rows, 4, rng)
        try:
            out = self._call(case["entry"], v, o, d)
        except (DataError, EmbqError) as e:
            return self._refused(str(e), valid, v, o, d)
        except Exception as e:  # noqa: BLE001
            text = str(e)
            if DATA_MARK in text:
                return self._refused(text[text.rfind(DATA_MARK) + len(DATA_MARK):], valid, v, o, d)
            return {"outcome": "traceback", "detail": f"{type(e).__name__}: {text[-300:]}"}
        if not valid:
            return {"outcome": "out_of_bounds_read" if oob else "silent_wrong",
                    "detail": f"answered {out.reshape(-1)[:4].tolist()}"}  # fmt: skip
        ref = self._reference(case["entry"], v, o, d)
        got = out.reshape(-1).double().numpy()
        if ref is None:
            return {"outcome": "identical_answer", "detail": "answered (no fp32 reference)"}
        if got.shape == ref.shape and np.all(np.abs(got - ref) <= LOGIT_TOL * (1 + np.abs(ref))):
            return {"outcome": "identical_answer", "detail": ""}
        return {"outcome": "silent_wrong", "detail": f"{got[:4]} vs reference {ref[:4]}"}

    def _refused(self, message: str, valid: bool, v, o, d) -> dict:
        if valid:
            return {"outcome": "silent_wrong", "detail": f"a valid input was refused: {message}"}
        outside = numbers_quoted_from_outside(message, v, o, d, self.rows)
        if outside:
            return {"outcome": "out_of_bounds_read",
                    "detail": f"the refusal quotes {outside[:5]}: {message[:200]}"}  # fmt: skip
        return {"outcome": "clean_refusal", "detail": message[:160]}


def _first_row(values, offsets, dense, features: int):
    """The first row of a batch of 4 as a batch of 1."""
    import torch

    batch = (offsets.numel() - 1) // features
    parts, lengths = [], []
    for f in range(features):
        a, b = int(offsets[f * batch]), int(offsets[f * batch + 1])
        parts.append(values[a:b])
        lengths.append(b - a)
    offs = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    return torch.cat(parts), offs, dense[:1]


# --------------------------------------------------------------------------- artifact edits


def canonical_digest(m: dict) -> str:
    """docs/artifact.md's digest, computed here independently of embq."""
    body = {k: v for k, v in m.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_edit(fn, seal: bool):
    def apply(path: Path, rng) -> None:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        fn(m)
        if seal:
            m["digest"] = canonical_digest(m)
        (path / "manifest.json").write_text(json.dumps(m, indent=1), encoding="utf-8")

    return apply


def _swap_features(m: dict) -> None:
    names = m["model"]["config"]["sparse_feature_names"]
    names[0], names[1] = names[1], names[0]


def _pick(m: dict, key: str, value: Any) -> None:
    m["tables"][0][key] = value


JSON_EDITS = {
    "pooling SUM -> MEAN": lambda m: m["model"]["pooling"].update({m["tables"][0]["name"]: "MEAN"}),
    "tables reversed": lambda m: m.update(tables=m["tables"][::-1]),
    "config features swapped": _swap_features,
    "config rows - 1": lambda m: m["model"]["config"]["num_embeddings"].__setitem__(0, m["model"]["config"]["num_embeddings"][0] - 1),
    "config dense_in_features + 1": lambda m: m["model"]["config"].update(dense_in_features=m["model"]["config"]["dense_in_features"] + 1),
    "table dim x 2": lambda m: _pick(m, "dim", m["tables"][0]["dim"] * 2),
    "format -> cb4-shared": lambda m: _pick(m, "format", "cb4-shared"),
    "format -> int8": lambda m: _pick(m, "format", "int8"),
    "bytes_per_row + 1": lambda m: _pick(m, "bytes_per_row", m["tables"][0]["bytes_per_row"] + 1),
    "file ../x": lambda m: _pick(m, "file", "../x.safetensors"),
    "file absolute": lambda m: _pick(m, "file", "/etc/passwd"),
    "file with NUL": lambda m: _pick(m, "file", m["tables"][0]["file"] + "\x00"),
    "file of another table": lambda m: _pick(m, "file", m["tables"][1]["file"]),
    "params + codebook": lambda m: _pick(m, "params", ["codebook"]),
    "feature_names renamed": lambda m: _pick(m, "feature_names", ["zz"]),
    "rows as a string": lambda m: _pick(m, "rows", "1000"),
    "rows as true": lambda m: _pick(m, "rows", True),
    "pooling MAX": lambda m: m["model"]["pooling"].update({m["tables"][0]["name"]: "MAX"}),
    "pooling of one table dropped": lambda m: m["model"]["pooling"].pop(m["tables"][0]["name"]),
    "dense kind unknown": lambda m: m["dense"]["meta"].update(kind="int3-magic"),
    "dense tensors list wrong": lambda m: m["dense"].update(tensors=m["dense"]["tensors"][1:]),
    "dense tensors an integer": lambda m: m["dense"].update(tensors=5),
    "model type other": lambda m: m["model"].update(type="wide-and-deep"),
    "model config not an object": lambda m: m["model"].update(config=[1, 2]),
    "version 2": lambda m: m.update(version=2),
    "tables not a list": lambda m: m.update(tables={"a": 1}),
    "table listed twice": lambda m: m["tables"].append(m["tables"][0]),
    "table removed": lambda m: m["tables"].pop(),
    "stats edited": lambda m: m["tables"][0]["stats"].update(relative_mse=0.0),
}  # fmt: skip
# edits whose sealed form is a legitimate, different artifact (not probed sealed)
SEALED_IS_LEGAL = {"pooling SUM -> MEAN", "stats edited"}


def _flip(rel: str | None):
    def apply(path: Path, rng) -> None:
        files = [p for p in path.rglob("*") if p.is_file()]
        target = path / rel if rel else files[int(rng.integers(0, len(files)))]
        data = bytearray(target.read_bytes())
        data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        target.write_bytes(bytes(data))

    return apply


def _truncate(path: Path, rng) -> None:
    files = [p for p in path.rglob("*") if p.is_file()]
    target = files[int(rng.integers(0, len(files)))]
    os.truncate(target, int(rng.integers(0, target.stat().st_size)))


def _append(path: Path, rng) -> None:
    files = [p for p in path.rglob("*") if p.is_file()]
    with open(files[int(rng.integers(0, len(files)))], "ab") as f:
        f.write(rng.bytes(int(rng.integers(1, 64))))


def _symlink_escape(path: Path, rng) -> None:
    table = sorted((path / "tables").iterdir())[0]
    outside = path.parent / (path.name + "-outside.safetensors")
    shutil.copy(table, outside)
    table.unlink()
    table.symlink_to(outside)


def _manifest_as_dir(path: Path, rng) -> None:
    (path / "manifest.json").unlink()
    (path / "manifest.json").mkdir()


OTHER_EDITS = {
    "deep nesting": lambda p, r: (p / "manifest.json").write_text(
        '{"format": "embq", "version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "manifest not UTF-8": lambda p, r: (p / "manifest.json").write_bytes(b'{"format": "\xff"}'),
    "manifest empty": lambda p, r: (p / "manifest.json").write_bytes(b""),
    "manifest a list": lambda p, r: (p / "manifest.json").write_text("[1, 2]"),
    "manifest is a directory": _manifest_as_dir,
    "table symlinked outside": _symlink_escape,
    "table file removed": lambda p, r: sorted((p / "tables").iterdir())[0].unlink(),
    "dense file removed": lambda p, r: (p / "dense.safetensors").unlink(),
    "digest removed": _json_edit(lambda m: m.pop("digest", None), seal=False),
    "digest malformed": _json_edit(lambda m: m.update(digest="sha256:XYZ"), seal=False),
}  # fmt: skip


def artifact_edits(pristine: Path, root: Path, seed: int, quick: bool) -> list[dict]:
    """Copies of the artifact, each with one edit applied; one try per copy."""
    rng = np.random.default_rng(seed)
    edits = []
    for name, fn in JSON_EDITS.items():
        edits.append((f"unsealed: {name}", _json_edit(fn, seal=False)))
        if name not in SEALED_IS_LEGAL:
            edits.append((f"sealed: {name}", _json_edit(fn, seal=True)))
    edits += list(OTHER_EDITS.items())
    n = 1 if quick else 4
    edits += [(f"manifest bit flip {k}", _flip("manifest.json")) for k in range(20 * n)]
    edits += [(f"bit flip in any file {k}", _flip(None)) for k in range(15 * n)]
    edits += [(f"truncation {k}", _truncate) for k in range(8 * n)]
    edits += [(f"bytes appended {k}", _append) for k in range(5 * n)]
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for k, (name, fn) in enumerate(edits):
        path = Path(shutil.copytree(pristine, root / f"e{k}.embq"))
        fn(path, rng)
        cases.append({"category": "artifact edit", "name": name, "path": str(path),
                      "kernel": "compact" if k % 3 == 2 else "auto"})  # fmt: skip
    return cases


class ArtifactRunner:
    """Loads each edited copy with the Predictor and compares its answer with the pristine
    artifact's on one batch."""

    def __init__(self, context: dict) -> None:
        from embq_serving.predictor import Predictor

        self.Predictor = Predictor
        first = Predictor(context["artifact"])
        self.dense, self.sparse = reference_batch(first.metadata(), 8, context["seed"])
        self.want = {k: Predictor(context["artifact"], kernel=k).logits(self.dense, self.sparse)
                     for k in ("auto", "compact")}  # fmt: skip

    def run(self, case: dict) -> dict:
        from embq.errors import EmbqError

        try:
            got = self.Predictor(case["path"], kernel=case["kernel"]).logits(self.dense, self.sparse)
        except EmbqError as e:
            return {"outcome": "clean_refusal", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
        except Exception as e:  # noqa: BLE001
            return {"outcome": "traceback", "detail": f"{type(e).__name__}: {str(e)[-300:]}"}
        if np.array_equal(got, self.want[case["kernel"]]):
            return {"outcome": "identical_answer", "detail": "loaded; the same answer"}
        return {"outcome": "silent_wrong", "detail": f"loaded; answered {got[:3]} instead of "
                                                     f"{self.want[case['kernel']][:3]}"}  # fmt: skip


# --------------------------------------------------------------------------- data files


def data_cases(root: Path, seed: int) -> list[dict]:
    """Malformed raw Criteo files for `embq data prepare`: (good rows, bad lines) known."""
    import gzip

    from embq.data.synth import write_synthetic

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    good = write_synthetic(root / "good.tsv", rows=200, seed=seed, progress=False)
    lines = Path(good).read_bytes().splitlines(keepends=True)
    body = b"".join(lines)

    def with_line(k: int, bad: bytes) -> bytes:
        return b"".join(lines[:k]) + bad + b"".join(lines[k:])

    files: dict[str, tuple[bytes, int | None, int | None]] = {
        "binary line": (with_line(50, bytes(range(256)) + b"\n"), 200, None),
        "NUL bytes in a line": (with_line(10, lines[10].replace(b"\t", b"\x00", 3)), 200, 1),
        "latin-1 byte": (with_line(5, lines[5].replace(b"\t", b"\t\xe9", 1)), 200, 1),
        "gzip-compressed file": (gzip.compress(body), 200, 0),
        "truncated gzip": (gzip.compress(body)[:600], None, None),
        "random bytes": (rng.bytes(200_000), 0, None),
        "5 MB line": (with_line(5, b"1\t" + b"9" * 5_000_000 + b"\n"), 200, 1),
        "only newlines": (b"\n" * 50, 0, 50),
        "UTF-8 BOM first": (b"\xef\xbb\xbf" + body, 200, 0),  # the BOM skipped, or

        "CR line ends": (body.replace(b"\n", b"\r"), None, None),
        "41 fields": (with_line(7, lines[7].rstrip(b"\n") + b"\tx\n"), 200, 1),
        "label 2": (with_line(9, b"2" + lines[9][1:]), 200, 1),
        "9 hex digits": (with_line(3, b"\t".join(lines[3].rstrip(b"\n").split(b"\t")[:-1]
                                                 + [b"123456789"]) + b"\n"), 200, 1),
        "huge count": (with_line(5, lines[5].replace(b"\t", b"\t99999999999999999999999", 1)), 200, 1),
        "trailing garbage without newline": (body + b"\xff\xfe\x00garbage", 200, None),
        "empty file": (b"", 0, 0),
    }  # fmt: skip
    also = {"UTF-8 BOM first": [199, 1]}  # ... its first line refused: both are clean
    cases = []
    for k, (name, (data, good_rows, bad)) in enumerate(files.items()):
        path = root / f"f{k}.tsv"
        path.write_bytes(data)
        cases.append({"category": "data file", "name": name, "inputs": [str(path)],
                      "output": str(root / f"out{k}"), "good": good_rows, "bad": bad,
                      "or": also.get(name)})  # fmt: skip
    kept = root / "existing"
    kept.mkdir()
    (kept / "mine.txt").write_text("a user's file")
    cases += [
        {"category": "data file", "name": "missing input", "inputs": [str(root / "nope.tsv")],
         "output": str(root / "out-missing"), "good": None, "bad": None},
        {"category": "data file", "name": "a directory as input", "inputs": [str(root)],
         "output": str(root / "out-dir"), "good": None, "bad": None},
        {"category": "data file", "name": "output exists", "inputs": [str(good)],
         "output": str(kept), "good": None, "bad": None, "keep": str(kept / "mine.txt")},
    ]  # fmt: skip
    return cases


class DataRunner:
    """Runs `embq data prepare` in this process (the child), capturing what it prints."""

    def __init__(self, context: dict) -> None:
        pass

    def run(self, case: dict) -> dict:
        from embq import cli

        err, out = io.StringIO(), io.StringIO()
        argv = ["data", "prepare", "--input", *case["inputs"], "--output", case["output"],
                "--table-size", "1000", "--quiet"]  # fmt: skip
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # noqa: BLE001
            return {"outcome": "traceback", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
        keep = case.get("keep")
        if keep and (not Path(keep).exists() or Path(keep).read_text() != "a user's file"):
            return {"outcome": "silent_wrong", "detail": "a user's file was lost"}
        if code == 2:
            return {"outcome": "clean_refusal", "detail": err.getvalue().strip()[-200:]}
        if code != 0:
            return {"outcome": "traceback", "detail": f"exit {code}: {err.getvalue()[-200:]}"}
        summary = json.loads((Path(case["output"]) / "summary.json").read_text())
        read, refused = summary["rows_read"], summary["rows_refused"]
        good, bad = case["good"], case["bad"]
        if case.get("or") and [read, refused] == case["or"]:
            good, bad = case["or"]
        if good is not None and read != good:
            return {"outcome": "silent_wrong",
                    "detail": f"{read} rows accepted, {good} expected ({refused} refused)"}  # fmt: skip
        if bad is not None and refused != bad:
            return {"outcome": "silent_wrong", "detail": f"{refused} lines refused, {bad} expected"}
        if good is None and refused == 0:
            return {"outcome": "silent_wrong", "detail": f"{read} rows accepted, none refused"}
        outcome = "clean_refusal" if refused else "identical_answer"
        return {"outcome": outcome, "detail": f"{read} rows read, {refused} refused"}
