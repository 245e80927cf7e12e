"""The one check of a model's input before any lookup kernel reads it.

fbgemm's TBE and ATen's n-bit ops run with their bounds checks off, and they trust `offsets`:
an offset outside `values` makes them read (or print) memory that is not the input, or crash
the process. So every entry point (the scripted `DLRMCore`, the eager model, the Predictor, HTTP,
each kernel module called on its own) runs `SparseCheck` once, before any kernel:

- values: a 1-D int32 / int64 tensor of ids, offsets: a 1-D int32 / int64 tensor;
- offsets of length F * B + 1 (F features, B rows), offsets[0] == 0, non-decreasing, and
  offsets[-1] == len(values): then every bag lies inside `values`;
- every id of feature f in [0, rows of f's table);

and `check_dense` checks the dense input: float [B, n_dense], finite after the cast to float32.

A refusal raises embq.errors.DataError ("Expected ..., but got ..." / naming feature, row, id
and table); under TorchScript a torch.jit.Error whose message ends with
"embq.errors.DataError: ..." (`data_error_message` reads it back).

Cost at batch 512 (26 features, 20 ids per bag: 266,240 ids): one comparison over the 13,313
offsets and one min / max over the ids when every id lies below the smallest table; otherwise
one max over the ids of each feature whose table is smaller than the largest id.
"""

from __future__ import annotations

from typing import Any

import torch

from embq.errors import ConfigError, DataError

# feature_rows entry of a feature that no table behind this check serves (its ids are not
# looked up here, so any value is accepted)
NO_TABLE = 2**63 - 1
# How many offending ids a refusal names.
SHOWN_IDS = 5
DATA_ERROR_MARK = "embq.errors.DataError: "


def _kind(t: torch.Tensor) -> str:
    """A tensor's element type in words (TorchScript prints dtypes as numbers)."""
    if t.is_floating_point():
        return "floating-point"
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    if t.dtype == torch.int64:
        return "int64"
    if t.dtype == torch.int32:
        return "int32"
    return "small-integer"


def check_dense(dense: torch.Tensor, batch: int, n_dense: int) -> torch.Tensor:
    """float32 [B, n_dense] from a real (float or integer) tensor of that shape whose values are
    finite in float32; DataError otherwise (`batch` < 0 accepts any B)."""
    if dense.dim() != 2 or dense.shape[1] != n_dense or (batch >= 0 and dense.shape[0] != batch):
        expected = "B" if batch < 0 else str(batch)
        raise DataError(
            f"Expected dense of shape [{expected}, {n_dense}], but got {list(dense.shape)}"
        )
    if dense.is_complex() or dense.dtype == torch.bool:
        raise DataError(f"Expected real dense values, but got {_kind(dense)} values")
    x = dense.to(torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        r, c = int(bad[0, 0]), int(bad[0, 1])
        raise DataError(
            f"Expected finite float32 dense values (no NaN, Inf or |x| > 3.4e38), but got {float(x[r, c])} at "
            f"[{r}][{c}] ({bad.shape[0]} such values)"
        )
    return x


class SparseCheck(torch.nn.Module):
    """The check of a jagged sparse input (see the module docstring); scriptable.

    forward(values int [N], offsets int [F * B + 1]) -> (values int64, offsets int64, B):
    the input as contiguous int64 (no copy when it already is), once checked.

    Args:
        feature_names: the F features, in the input's key-major order.
        table_names: the table behind each feature ("" for none).
        feature_rows: rows of that table (valid ids 0 .. rows - 1); NO_TABLE for a feature no
            table here serves.
    """

    def __init__(
        self, feature_names: list[str], table_names: list[str], feature_rows: list[int]
    ) -> None:
        super().__init__()
        if not feature_names or not len(feature_names) == len(table_names) == len(feature_rows):
            raise ConfigError(
                f"a sparse input check needs one table name and row count per feature, got "
                f"{len(feature_names)} features, {len(table_names)} tables, {len(feature_rows)} rows"
            )
        self.feature_names = [str(f) for f in feature_names]
        self.table_names = [str(t) for t in table_names]
        self.feature_rows = [int(r) for r in feature_rows]
        self.num_features: int = len(self.feature_rows)
        self.min_rows: int = min(self.feature_rows)
        self.shown_ids: int = SHOWN_IDS  # (module constants are not visible to TorchScript)

    def forward(
        self, values: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        batch = self.check_offsets(values, offsets)
        # the kernels read raw contiguous int64 buffers: a strided view would be read as if it
        # were contiguous (other ids, silently, or past the view's end)
        values = values.to(torch.int64).contiguous()
        offsets = offsets.to(torch.int64).contiguous()
        self.check_ids(values, offsets, batch)
        return values, offsets, batch

    def check_offsets(self, values: torch.Tensor, offsets: torch.Tensor) -> int:
        """B, once values and offsets are 1-D integer tensors and every bag lies in values."""
        if values.dim() != 1 or (values.dtype != torch.int64 and values.dtype != torch.int32):
            raise DataError(
                f"Expected values (the ids) as a 1-D int64 or int32 tensor, but got {_kind(values)} values of "
                f"shape {list(values.shape)}"
            )
        if offsets.dim() != 1 or (offsets.dtype != torch.int64 and offsets.dtype != torch.int32):
            raise DataError(
                f"Expected offsets as a 1-D int64 or int32 tensor, but got {_kind(offsets)} values of shape "
                f"{list(offsets.shape)}"
            )
        n = offsets.shape[0]
        if n < 1 or (n - 1) % self.num_features != 0:
            raise DataError(
                f"Expected offsets of length F * B + 1 for F = {self.num_features} features (a bag per feature "
                f"and row, plus one), but got {n}"
            )
        first = int(offsets[0])
        if first != 0:
            raise DataError(f"Expected offsets[0] == 0, but got {first}")
        if n > 1:
            down = offsets[1:] < offsets[:-1]
            if bool(down.any()):
                i = int(down.nonzero()[0, 0])
                raise DataError(
                    f"Expected non-decreasing offsets, but got offsets[{i + 1}] = {int(offsets[i + 1])} after "
                    f"offsets[{i}] = {int(offsets[i])}"
                )
        last = int(offsets[n - 1])
        if last != values.shape[0]:
            raise DataError(
                f"Expected offsets[-1] == the number of ids ({values.shape[0]}), but got {last}"
            )
        return (n - 1) // self.num_features

    def check_ids(self, values: torch.Tensor, offsets: torch.Tensor, batch: int) -> None:
        """Every id of feature f in [0, feature_rows[f]); values / offsets int64, checked by
        `check_offsets`."""
        if values.shape[0] == 0:
            return
        low, high = torch.aminmax(values)
        lowest, highest = int(low), int(high)
        if lowest >= 0 and highest < self.min_rows:
            return
        ok = lowest >= 0
        if ok:
            # only features whose table is no larger than the largest id can hold a bad one
            starts: list[int] = offsets[0::batch].tolist()
            for f in range(self.num_features):
                if ok and self.feature_rows[f] <= highest and starts[f + 1] > starts[f]:
                    if int(values[starts[f] : starts[f + 1]].max()) >= self.feature_rows[f]:
                        ok = False
        if not ok:
            raise DataError(self.out_of_range_message(values, offsets, batch))

    def out_of_range_message(self, values: torch.Tensor, offsets: torch.Tensor, batch: int) -> str:
        """Names the first SHOWN_IDS ids outside their table: feature, row of the batch, id,
        valid range, table."""
        rows = torch.tensor(self.feature_rows, dtype=torch.int64)
        lengths = offsets[1:] - offsets[:-1]
        feature_of_id = torch.repeat_interleave(
            torch.arange(self.num_features * batch, dtype=torch.int64) // batch, lengths
        )
        bad = ((values < 0) | (values >= rows[feature_of_id])).nonzero()
        parts: list[str] = []
        for k in range(min(bad.shape[0], self.shown_ids)):
            i = int(bad[k, 0])
            bag = int(torch.searchsorted(offsets, torch.tensor([i]), right=True)[0]) - 1
            f = bag // batch
            parts.append(
                f"feature '{self.feature_names[f]}' row {bag % batch}: id {int(values[i])} not in [0, {self.feature_rows[f]}) (table '{self.table_names[f]}')"
            )  # fmt: skip
        more = ""
        if bad.shape[0] > self.shown_ids:
            more = f" (and {bad.shape[0] - self.shown_ids} more)"
        return "ids out of range: " + "; ".join(parts) + more


def check_kjt(kjt: Any, rows_by_feature: dict[str, int], table_by_feature: dict[str, str]) -> None:
    """Check a KeyedJaggedTensor as `SparseCheck` checks plain tensors, in its own key order:
    its offsets inside its values, and the ids of every feature a table serves inside that
    table (keys no table serves are not looked up, so their ids are not checked). For modules
    that hand a KJT to TorchRec / fbgemm ops, which trust its offsets; DataError otherwise."""
    keys = [str(k) for k in kjt.keys()]
    if not keys:
        raise DataError("Expected a KeyedJaggedTensor with at least one key, but got none")
    check = SparseCheck(
        keys,
        [table_by_feature.get(k, "") for k in keys],
        [rows_by_feature.get(k, NO_TABLE) for k in keys],
    )
    check(kjt.values(), kjt.offsets())


def data_error_message(error: BaseException) -> str | None:
    """The DataError message a scripted module raised (in a torch.jit.Error, or a RuntimeError
    when raised in a forked task), or None for any other error."""
    text = str(error)
    at = text.rfind(DATA_ERROR_MARK)
    if at < 0:
        return None
    return text[at + len(DATA_ERROR_MARK) :].strip()


def run_checked(fn: Any, *args: Any) -> Any:
    """fn(*args), with a scripted module's refusal raised again as a DataError."""
    try:
        return fn(*args)
    except (torch.jit.Error, RuntimeError) as e:
        message = data_error_message(e)
        if message is None:
            raise
        raise DataError(message) from None
