"""`Predictor`: an embq artifact loaded once, answering click probabilities for batches of rows.

The Predictor is framework-neutral: the HTTP app (`embq_serving.http`), a Triton or Ray Serve
adapter, or a plain Python program all call `predict` / `predict_rows`. It owns input
validation, so every adapter refuses the same inputs with the same messages.

Inputs of one batch of B rows:

    dense    float array-like [B, n_dense] (numpy, torch, nested lists), cast to float32
    sparse   one of
             - a torchrec KeyedJaggedTensor with exactly the model's features (any key order),
               unweighted, stride B;
             - a dict {feature: [ids of row 0, ids of row 1, ...]} with B lists per feature
               (an empty list is an empty bag, which SUM pooling turns into zeros);
             - an int array-like [B, n_features], one id per feature per row, columns in the
               order of `input_spec.feature_names`.

Every id must lie in [0, rows of the feature's table). Bad inputs are refused with a message
naming what is wrong (for ids: feature, row, value and table) before any kernel sees them: the
shapes and types here, the ids by the model's own check (`embq.runtime.validate`), which every
entry point shares.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embq.errors import ArtifactError, DataError

# How many offending positions an error message names before it summarises.
_SHOWN = 5


class InvalidInputError(DataError):
    """A prediction input the model cannot answer: wrong shapes, features, ids or values."""


@dataclass(frozen=True)
class InputSpec:
    """What one row of input must hold.

    Attributes:
        n_dense: dense (float) inputs per row.
        feature_names: the sparse features, in the order the model's KJT uses.
        rows: rows of the table behind each feature (valid ids are 0 .. rows - 1), same order.
    """

    n_dense: int
    feature_names: tuple[str, ...]
    rows: tuple[int, ...]

    @property
    def rows_by_feature(self) -> dict[str, int]:
        return dict(zip(self.feature_names, self.rows))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> InputSpec:
        """Read the expected inputs from `embq.runtime.inference_metadata`'s dict."""
        inputs = meta["inputs"]
        if not inputs.get("dense"):
            raise ArtifactError(
                "the artifact holds no full model (no dense towers); it cannot predict"
            )
        names = tuple(str(f) for f in inputs["sparse"]["feature_names"])
        rows = inputs["sparse"]["table_rows"]
        return cls(
            n_dense=int(inputs["dense"]["shape"][1]),
            feature_names=names,
            rows=tuple(int(rows[f]) for f in names),
        )


def _listing(items: Sequence[Any]) -> str:
    """'a', 'b', 'c' (and 7 more) — short enough for an error message."""
    head = ", ".join(repr(x) for x in list(items)[:_SHOWN])
    return head + (f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


# --------------------------------------------------------------------------- dense


def dense_batch(dense: Any, spec: InputSpec) -> np.ndarray:
    """Validate dense inputs and return them as float32 [B, n_dense] (C-contiguous).

    Raises InvalidInputError for a wrong shape, an empty batch, non-numbers, or values that are
    NaN/Inf or overflow float32.
    """
    if hasattr(dense, "detach") and hasattr(dense, "cpu"):  # a torch tensor
        dense = dense.detach().cpu().numpy()
    try:
        arr = np.asarray(dense)
    except ValueError as e:  # ragged nested lists
        raise InvalidInputError(
            f"dense must be a [batch, {spec.n_dense}] array of floats: {e}"
        ) from e
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidInputError(
            f"dense must hold real numbers (float or int), got dtype {arr.dtype}; "
            f"expected a [batch, {spec.n_dense}] array of floats"
        )
    if arr.ndim != 2 or arr.shape[1] != spec.n_dense:
        raise InvalidInputError(
            f"Expected dense of shape [batch, {spec.n_dense}], but got {list(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise InvalidInputError("the batch is empty; send at least one row")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad = np.argwhere(~finite)
        where = ", ".join(f"[{r}][{c}]" for r, c in bad[:_SHOWN])
        raise InvalidInputError(
            f"dense values must be finite float32 numbers; NaN, Inf or |x| > 3.4e38 at {where}"
            + (f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else "")
        )
    return out


# --------------------------------------------------------------------------- sparse


def _as_ids(values: Any, what: str) -> np.ndarray:
    """Any integer array-like -> int64 numpy, refusing floats, bools and overflowing ints."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
        if arr.dtype == object:  # Python ints beyond int64 land here
            arr = np.asarray(values, dtype=np.int64)
    except (ValueError, OverflowError, TypeError) as e:
        raise InvalidInputError(f"{what} must be integer ids in int64 range: {e}") from e
    if arr.size and (arr.dtype.kind not in "iu" or arr.dtype == np.bool_):
        raise InvalidInputError(f"{what} must be integer ids, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{what} holds ids beyond the int64 range")
    return arr.astype(np.int64, copy=False)


def _check_keys(keys: Sequence[str], spec: InputSpec) -> None:
    unknown = [k for k in keys if k not in spec.rows_by_feature]
    missing = [f for f in spec.feature_names if f not in set(keys)]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown features {_listing(unknown)}")
        if missing:
            parts.append(f"missing features {_listing(missing)}")
        raise InvalidInputError(
            "sparse features do not match the model: "
            + "; ".join(parts)
            + f". The model expects exactly {_listing(spec.feature_names)}"
        )
    if len(set(keys)) != len(keys):
        raise InvalidInputError(f"sparse features repeat a name: {_listing(list(keys))}")


def _from_dict(
    sparse: Mapping[str, Any], spec: InputSpec, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """{feature: B lists of ids} -> (values, lengths), key-major in spec order."""
    _check_keys([str(k) for k in sparse], spec)
    values, lengths = [], []
    for name in spec.feature_names:
        bags = sparse[name]
        if isinstance(bags, (str, bytes)) or not isinstance(bags, Sequence | np.ndarray):
            raise InvalidInputError(
                f"sparse[{name!r}] must be a list of {batch} id lists, one per row"
            )
        if len(bags) != batch:
            raise InvalidInputError(
                f"Expected {batch} id lists for feature {name!r} (one per row), but got {len(bags)}"
            )
        try:
            sizes = [len(bag) for bag in bags]
        except TypeError:
            raise InvalidInputError(
                f"sparse[{name!r}] must hold one list of ids per row, e.g. [[3], [7, 9]]"
            ) from None
        # One conversion per feature, not per bag: a 512-row request has 13,312 bags.
        ids = _as_ids(list(itertools.chain.from_iterable(bags)), f"sparse[{name!r}]")
        if ids.ndim != 1:
            raise InvalidInputError(f"sparse[{name!r}] must hold flat lists of ids, one per row")
        values.append(ids)
        lengths.extend(sizes)
    return np.concatenate(values), np.asarray(lengths, dtype=np.int64)


def _from_matrix(sparse: Any, spec: InputSpec, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """int [B, n_features], one id per feature per row -> (values, lengths), key-major."""
    ids = _as_ids(sparse, "sparse ids")
    n = len(spec.feature_names)
    if ids.ndim != 2 or ids.shape != (batch, n):
        raise InvalidInputError(
            f"Expected sparse ids of shape [{batch}, {n}] (one id per feature per row, features "
            f"in the order {_listing(spec.feature_names)}), but got {list(ids.shape)}"
        )
    return np.ascontiguousarray(ids.T).reshape(-1), np.ones(n * batch, dtype=np.int64)


def _from_kjt(kjt: Any, spec: InputSpec, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A KeyedJaggedTensor -> (values, lengths), key-major in spec order."""
    keys = list(kjt.keys())
    _check_keys(keys, spec)
    if kjt.weights_or_none() is not None:
        raise InvalidInputError(
            "weighted sparse features are not supported by this model; drop the weights"
        )
    values = _as_ids(kjt.values(), "KeyedJaggedTensor values")
    lengths = _as_ids(kjt.lengths(), "KeyedJaggedTensor lengths")
    if lengths.ndim != 1 or values.ndim != 1 or lengths.size != len(keys) * batch:
        raise InvalidInputError(
            f"Expected a KeyedJaggedTensor with {len(keys)} x {batch} lengths (features x batch), "
            f"but got {lengths.size} lengths"
        )
    if (lengths < 0).any() or int(lengths.sum()) != values.size:
        raise InvalidInputError(
            f"KeyedJaggedTensor lengths must be non-negative and sum to its {values.size} values"
        )
    if keys != list(spec.feature_names):  # reorder the key-major blocks into the model's order
        lengths_2d = lengths.reshape(len(keys), batch)
        starts = np.concatenate([[0], np.cumsum(lengths_2d.sum(axis=1))])
        order = [keys.index(f) for f in spec.feature_names]
        values = np.concatenate([values[starts[k] : starts[k + 1]] for k in order])
        lengths = lengths_2d[order].reshape(-1)
    return values, lengths


def _is_kjt(obj: Any) -> bool:
    """Whether obj is a torchrec KeyedJaggedTensor, without importing torchrec when it is not
    loaded (a TorchScript deployment may not have it)."""
    jagged = sys.modules.get("torchrec.sparse.jagged_tensor")
    return jagged is not None and isinstance(obj, jagged.KeyedJaggedTensor)


def sparse_batch(sparse: Any, spec: InputSpec, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate sparse inputs for a batch of `batch` rows.

    Returns:
        (values int64 [N], lengths int64 [n_features * batch]), key-major in
        `spec.feature_names` order: exactly a KeyedJaggedTensor's values() and lengths() with
        those keys. The ids' ranges are checked by the model (`embq.runtime.validate`), the one
        check every entry point shares.
    """
    if _is_kjt(sparse):
        if sparse.stride() != batch:
            raise InvalidInputError(
                f"Expected a KeyedJaggedTensor of stride (batch size) {batch}, but got {sparse.stride()}"
            )
        values, lengths = _from_kjt(sparse, spec, batch)
    elif isinstance(sparse, Mapping):
        values, lengths = _from_dict(sparse, spec, batch)
    else:
        values, lengths = _from_matrix(sparse, spec, batch)
    return np.ascontiguousarray(values), lengths


def rows_to_batch(rows: Sequence[Mapping[str, Any]], spec: InputSpec) -> tuple[np.ndarray, dict]:
    """JSON-style rows [{"dense": [n_dense floats], "sparse": {feature: [ids]}}] -> (dense
    float32 [B, n_dense], {feature: B id lists}), checked row by row so messages name the row."""
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
        raise InvalidInputError('rows must be a list of {"dense": [...], "sparse": {...}} objects')
    if not rows:
        raise InvalidInputError("the batch is empty; send at least one row")
    dense, sparse = [], {f: [] for f in spec.feature_names}
    expected = set(spec.feature_names)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or set(row) != {"dense", "sparse"}:
            got = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise InvalidInputError(
                f'rows[{i}] must be an object with keys "dense" and "sparse", got {got}'
            )
        d, s = row["dense"], row["sparse"]
        if isinstance(d, (str, bytes)) or not isinstance(d, Sequence) or len(d) != spec.n_dense:
            n = len(d) if isinstance(d, Sequence) else type(d).__name__
            raise InvalidInputError(
                f"rows[{i}].dense must be a list of {spec.n_dense} numbers, got {n}"
            )
        if not isinstance(s, Mapping):
            raise InvalidInputError(f"rows[{i}].sparse must be an object {{feature: [ids]}}")
        if set(s) != expected:
            try:
                _check_keys([str(k) for k in s], spec)
            except InvalidInputError as e:
                raise InvalidInputError(f"rows[{i}]: {e}") from None
        dense.append(d)
        for name in spec.feature_names:
            sparse[name].append(s[name])
    return dense_batch(dense, spec), sparse


# --------------------------------------------------------------------------- the predictor


class BasePredictor:
    """Validation and scoring shared by every predictor; subclasses supply the model.

    A subclass sets `input_spec`, `_metadata` and `_core`, a callable
    (dense float32 [B, n_dense], values int64 [N], offsets int64 [F*B+1]) -> logits [B] or
    [B, 1], and calls `super().__init__()`.

    Thread safety: one predictor may be shared by any number of threads (the HTTP app does).
    Input validation runs concurrently; the model runs under one lock, because the fbgemm TBE
    forward updates module state (its timestep counter) and torch already spreads a batch over
    its intra-op threads, so concurrent forwards would only contend for the cores.
    """

    input_spec: InputSpec
    _metadata: dict[str, Any]
    _core: Any

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def metadata(self) -> dict[str, Any]:
        """Tables, formats, bytes, features and expected inputs (a JSON-able copy; see
        `embq.runtime.inference_metadata`)."""
        return copy.deepcopy(self._metadata)

    def health(self) -> str | None:
        """None while the predictor can serve, else why it cannot (see `Predictor`)."""
        return None

    def check_files(self) -> list[str]:
        """What changed on disk under the model since it was loaded (nothing to watch here)."""
        return []

    def _guard(self) -> None:
        """Called under the lock before every forward; raises to refuse serving."""

    def prepare(self, dense: Any, sparse: Any) -> tuple[Any, Any, Any]:
        """Validate one batch of B rows into the model's plain-tensor inputs.

        Returns:
            (dense float32 [B, n_dense], values int64 [N], offsets int64 [F * B + 1]): values
            key-major in `input_spec.feature_names` order, offsets the bag boundaries (a
            KeyedJaggedTensor's values() / offsets() with those keys), what the exported
            TorchScript module takes too.

        Raises:
            InvalidInputError (an embq.DataError) for anything the model cannot answer.
        """
        import torch

        x = dense_batch(dense, self.input_spec)
        if not x.flags.writeable:  # e.g. a slice of a memory-mapped dataset: torch wants to own it
            x = x.copy()
        values, lengths = sparse_batch(sparse, self.input_spec, x.shape[0])
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return torch.from_numpy(x), torch.from_numpy(values), torch.from_numpy(offsets)

    def _forward(self, dense: Any, sparse: Any):
        """Validate, then run the model under the lock: logits, float32 tensor [B]. The model
        checks offsets and ids itself (`embq.runtime.validate`) before any kernel reads them."""
        import torch

        from embq.runtime.validate import data_error_message

        x, values, offsets = self.prepare(dense, sparse)
        try:
            with self._lock, torch.inference_mode():
                self._guard()
                return self._core(x, values, offsets).reshape(-1).float()
        except DataError as e:
            raise InvalidInputError(str(e)) from None
        except (torch.jit.Error, RuntimeError) as e:  # a scripted model's DataError
            message = data_error_message(e)
            if message is None:
                raise
            raise InvalidInputError(message) from None

    def logits(self, dense: Any, sparse: Any) -> np.ndarray:
        """Logits (before the sigmoid), float32 [B]; same inputs as `predict`."""
        return self._forward(dense, sparse).numpy().copy()

    def predict(self, dense: Any, sparse: Any) -> np.ndarray:
        """Click probabilities, float32 [B] in [0, 1], for dense [B, n_dense] and sparse inputs
        (KJT, {feature: B id lists} or int ids [B, n_features]; see the module docstring)."""
        import torch

        return torch.sigmoid(self._forward(dense, sparse)).numpy().copy()

    def predict_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Probabilities, float32 [B], for JSON-style rows
        [{"dense": [floats], "sparse": {feature: [ids]}}] (the HTTP request body's "rows")."""
        dense, sparse = rows_to_batch(rows, self.input_spec)
        return self.predict(dense, sparse)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Predictor(BasePredictor):
    """An embq artifact served on CPU with embq.runtime's kernels (fbgemm TBE for row-wise
    tables, codebook bags for the rest): validated inputs in, click probabilities out.

    Thread-safe: see `BasePredictor` (one lock around the model's forward).

    Args:
        path: the artifact directory (X.embq). Loading verifies the manifest's digest, sizes and
            sha256 checksums and raises embq.ArtifactError for anything truncated, edited or
            tampered with.
        num_threads: if given, `torch.set_num_threads(num_threads)` (process-wide).
        kernel: the runtime's kernel choice (`embq.runtime.KERNEL_CHOICES`): "auto" (fastest:
            row-wise tables in fbgemm's TBE, short rows padded to a power of two), "compact"
            (least memory: 4-/2-bit tables read in place from the memory-mapped artifact by
            ATen's n-bit ops) or "tbe" (every row-wise table in the TBE, unpadded); None
            (default): the choices the artifact records per table (quantized from an
            `embq plan` plan), else "auto".
        expect_digest: pin the artifact: "sha256:..." (its `digest`, as `metadata()["digest"]`
            and `embq seal` show it); any other artifact is refused with an ArtifactError.

    Attributes:
        digest: the artifact's identity ("sha256:...", `embq.artifact.digest`).
        files: the artifact's files with their state when they were checked at load
            (`embq.artifact.watch`): `check_files` compares the disk with it.

    Example:
        predictor = Predictor("runs/demo/int4.embq")
        probs = predictor.predict(dense, {"cat_0": [[3], [7, 9]], ...})   # float32 [2]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_threads: int | None = None,
        kernel: str | None = None,
        expect_digest: str | None = None,
    ) -> None:
        import torch

        from embq.artifact.digest import check_expected_digest
        from embq.artifact.reader import load_artifact
        from embq.runtime.kernel_choice import KERNEL_TBE, check_kernel_choice
        from embq.runtime.load import inference_metadata, load_inference_model

        super().__init__()
        if kernel is not None:  # None: the kernels the artifact records
            check_kernel_choice(kernel)
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.path = Path(path)
        self.kernel = kernel
        artifact = load_artifact(self.path)
        check_expected_digest(artifact.digest, expect_digest, str(artifact.path))
        self.digest = artifact.digest
        self._model = load_inference_model(artifact, kernel=kernel).eval()
        self._metadata = inference_metadata(artifact, kernel)
        # each file's state from before its checksum was checked: a change since then (even
        # while loading) means the model may not be what was checked
        self.files = artifact.file_states
        changed = self.files.changes()
        if changed:
            raise ArtifactError(
                f"{artifact.path} changed while it was being loaded ({'; '.join(changed)}); "
                "publish artifacts by swapping in a new one, never by editing one in place"
            )
        # the table files the kernels read in place at every lookup (memory-mapped: "aten-nbit"
        # and codebook bags; the TBE holds a copy), held open and fstat-ed before every forward:
        # a truncation or an in-place write of the mapped file shows in its size and times
        # (~2 us a file here; a stat by path, which also sees replacements, is the watcher's)
        self._changed: list[str] = []
        self._mapped: list[tuple[int, tuple[int, int, int]]] = []
        for t in self._metadata["tables"]:
            if t["kernel"] != KERNEL_TBE:
                path = artifact.path / artifact.tables[t["name"]].file
                state = self.files.states[path]
                fd = os.open(path, os.O_RDONLY)
                self._mapped.append((fd, (state.size, state.mtime_ns, state.ctime_ns)))
        weakref.finalize(self, _close_all, [fd for fd, _ in self._mapped])
        self.input_spec = InputSpec.from_metadata(self._metadata)
        # The runtime's core takes the plain tensors `prepare` validated; the model's KJT front
        # end would only repeat those checks. It is also exactly what TorchScript export saves.
        self._core = self._model.core
        self._warm_up()

    def check_files(self) -> list[str]:
        """Compare every file of the artifact with its state when it was checked at load; what
        changed (removed, replaced, truncated, grown, modified in place). Once something has
        changed the predictor stops serving for good (`health`): the model in memory may no
        longer be the artifact that was checked, and a memory-mapped table file that shrank
        would crash the process on its next lookup. A server calls this periodically."""
        if not self._changed:
            self._changed = self.files.changes()
        return list(self._changed)

    def health(self) -> str | None:
        """None while the artifact on disk is the one loaded, else why it is not (from the
        last `check_files`, or from the check of the memory-mapped table files that precedes
        every forward)."""
        if not self._changed:
            return None
        return (
            f"the artifact {self.path} changed on disk after it was loaded: "
            + "; ".join(self._changed)
            + ". Artifacts are immutable once published: publish a new one and restart on it."
        )

    def _guard(self) -> None:
        """Refuse (ArtifactError) to run once the artifact changed; before every forward, fstat
        the table files the kernels read in place, so that a file truncated under the model is
        noticed before a lookup touches a page past its end (SIGBUS). A truncation during the
        forward itself can still crash the process: never edit a published artifact."""
        if not self._changed:
            for fd, recorded in self._mapped:
                st = os.fstat(fd)
                if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != recorded:
                    self._changed = self.files.changes() or ["a memory-mapped table file changed"]
                    break
        if self._changed:
            raise ArtifactError(self.health() or "")

    def _warm_up(self) -> None:
        """Two tiny predictions at load: the runtime scripts its kernels on first use, and
        TorchScript's executor optimizes a graph over its first runs (~0.35 s together for 26
        tables here), which would otherwise fall on the first requests."""
        spec = self.input_spec
        dense = np.zeros((2, spec.n_dense), dtype=np.float32)
        ids = np.zeros((2, len(spec.feature_names)), dtype=np.int64)
        for _ in range(2):
            self.predict(dense, ids)

    @property
    def model(self):
        """The runtime's inference module: forward(dense float32 [B, n_dense], KeyedJaggedTensor)
        -> logits float32 [B]; its `core` takes (dense, values, offsets) (see `prepare`)."""
        return self._model
