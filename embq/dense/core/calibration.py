"""Calibration: cached embedding outputs, the quantization plan, per-layer inputs, the BCE.

The embeddings are frozen: their pooled outputs for the calibration rows are computed once
(`CalibrationCache.from_batches`), so every method iterates on the MLP towers only.

The plan (`DenseQuantConfig` + `attach_quantizers`) decides, for every Linear, the weight and
input-activation bits and grids:

- first / last layer policy (`first_last`): the first bottom layer and the click-logit layer
  run at 8/8 bits (`"8bit"`, the default, as BRECQ and LAPQ do), at the requested bits
  (`"same"`), or stay fp32 (`"fp32"`);
- the top MLP's input (bottom output concatenated with pairwise dot products) is signed and gets
  a signed quantizer (symmetric by default); the bottom MLP's input gets one when the
  calibration dense features have negatives; every other input is post-ReLU and unsigned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from embq.dense.core.fakequant import ActQuantizer, QuantizedDLRMTowers, WeightQuantizer
from embq.dense.core.observers import max_mean_range, minmax_range, percentile_range
from embq.dense.core.quantizers import QuantSpec
from embq.errors import ConfigError, DataError

FIRST_LAST_POLICIES = ("8bit", "same", "fp32")


@dataclass
class DenseQuantConfig:
    """Bits and grids of a dense-tower quantization.

    Args:
        w_bits: weight bits (2..8; 32 = leave weights fp32).
        a_bits: activation bits (2..8; 32 = leave activations fp32). For SPARQ, the window bits.
        w_per_channel: one weight scale per output channel (row) instead of per tensor.
        w_symmetric: signed symmetric weight grid (True) or asymmetric with zero point (False).
        a_symmetric: grid of signed activations (the top-MLP input): symmetric or asymmetric.
        first_last: '8bit' | 'same' | 'fp32' for the first bottom layer and the logit layer.
        layer_bits: {layer name ("bottom.0", "top.2"): [w_bits, a_bits]}, overriding the bits
            above and the first/last policy for the layers it names (a plan from `embq plan`
            sets every layer's bits this way).
    """

    w_bits: int = 8
    a_bits: int = 8
    w_per_channel: bool = True
    w_symmetric: bool = False
    a_symmetric: bool = True
    first_last: str = "8bit"
    layer_bits: dict | None = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 32):
                raise ConfigError(f"{name} must be 2..8 or 32 (fp32), got {bits!r}.")
        if self.first_last not in FIRST_LAST_POLICIES:
            raise ConfigError(
                f"first_last must be one of {FIRST_LAST_POLICIES}, got {self.first_last!r}."
            )
        for name, bits in (self.layer_bits or {}).items():
            if not isinstance(bits, (list, tuple)) or len(bits) != 2 or not all(
                isinstance(b, int) and (2 <= b <= 8 or b == 32) for b in bits
            ):
                raise ConfigError(f"layer_bits[{name!r}] must be [w_bits, a_bits] (2..8 or 32), "
                                  f"got {bits!r}.")  # fmt: skip

    @property
    def tag(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationCache:
    """Calibration rows with the embeddings already looked up.

    dense [N, n_dense] float32, emb [N, F, D] pooled embeddings, labels [N] float32 (0 / 1).
    """

    dense: torch.Tensor
    emb: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = {len(self.dense), len(self.emb), len(self.labels)}
        if len(n) != 1:
            raise DataError(f"Calibration tensors disagree on the row count: {sorted(n)}.")
        if len(self.labels) == 0:
            raise DataError("The calibration set is empty: give at least one batch.")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    @torch.no_grad()
    def from_batches(
        cls, model: torch.nn.Module, batches: Iterable, rows: int | None = None
    ) -> CalibrationCache:
        """Look up the embeddings of `batches` (objects with .dense, .sparse KJT, .labels), up to
        `rows` rows."""
        if isinstance(batches, CalibrationCache):
            return batches.head(rows)
        dense, emb, labels, n = [], [], [], 0
        for batch in batches:
            dense.append(batch.dense.float())
            emb.append(model.sparse_arch(batch.sparse).float())
            labels.append(batch.labels.float().reshape(-1))
            n += len(labels[-1])
            if rows is not None and n >= rows:
                break
        if not labels:
            raise DataError("The calibration set is empty: give at least one batch.")
        return cls(torch.cat(dense), torch.cat(emb), torch.cat(labels)).head(rows)

    def head(self, rows: int | None) -> CalibrationCache:
        if rows is None or rows >= len(self):
            return self
        return CalibrationCache(self.dense[:rows], self.emb[:rows], self.labels[:rows])

    def slices(self, batch_size: int):
        for s in range(0, len(self), batch_size):
            yield slice(s, min(s + batch_size, len(self)))


@torch.no_grad()
def logits(
    towers: QuantizedDLRMTowers, cache: CalibrationCache, batch_size: int = 16384
) -> torch.Tensor:
    """Logits [N] of the towers over the whole cache (quantized as currently configured)."""
    out = [
        towers.forward_cached(cache.dense[s], cache.emb[s]).reshape(-1)
        for s in cache.slices(batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def bce(towers: QuantizedDLRMTowers, cache: CalibrationCache) -> float:
    """Mean binary cross-entropy (BCE with logits) of the towers on the calibration rows."""
    z = logits(towers, cache).double()
    return float(F.binary_cross_entropy_with_logits(z, cache.labels.double()))


@torch.no_grad()
def layer_inputs(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    names: list[str] | None = None,
    batch_size: int = 16384,
) -> dict[str, torch.Tensor]:
    """The input of every layer over the cache, with the towers as currently configured
    (call it on an unquantized copy, or with quantizers disabled, for fp32 statistics)."""
    wanted = set(names) if names is not None else {layer.name for layer in towers.layers()}
    store: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    hooks = []
    for layer in towers.layers():
        if layer.name in wanted:
            hooks.append(
                layer.register_forward_pre_hook(
                    lambda mod, args, name=layer.name: store[name].append(args[0].detach())
                )
            )
    try:
        for s in cache.slices(batch_size):
            towers.forward_cached(cache.dense[s], cache.emb[s])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


class quant_disabled:
    """Context: run the towers with every quantizer off (fp32 reference path)."""

    def __init__(self, towers: QuantizedDLRMTowers) -> None:
        self.towers = towers

    def __enter__(self):
        self.state = [
            (layer, layer.quantize_weight, layer.aq.enabled if layer.aq else None)
            for layer in self.towers.layers()
        ]
        self.towers.set_weight_quant(False)
        self.towers.set_act_quant(False)
        return self.towers

    def __exit__(self, *exc) -> None:
        for layer, wq, aq in self.state:
            layer.quantize_weight = wq
            if layer.aq is not None:
                layer.aq.enabled = aq


def layer_bits(
    layer_role: str, config: DenseQuantConfig, name: str | None = None
) -> tuple[int, int]:
    """(weight bits, activation bits) of a layer: its `config.layer_bits` entry, else the first /
    last policy (32 = fp32)."""
    if name is not None and name in (config.layer_bits or {}):
        w, a = config.layer_bits[name]  # type: ignore[index]
        return int(w), int(a)
    if layer_role in ("first", "last"):
        if config.first_last == "8bit":
            return (32 if config.w_bits == 32 else 8), (32 if config.a_bits == 32 else 8)
        if config.first_last == "fp32":
            return 32, 32
    return config.w_bits, config.a_bits


def attach_quantizers(
    towers: QuantizedDLRMTowers, cache: CalibrationCache, config: DenseQuantConfig
) -> None:
    """Give every layer its (uncalibrated) weight and activation quantizer per the plan."""
    dense_signed = bool(cache.dense.min() < 0)
    for layer in towers.layers():
        wb, ab = layer_bits(layer.role, config, layer.name)
        layer.codes = None
        layer.wq = (
            None
            if wb == 32
            else WeightQuantizer(
                QuantSpec(
                    wb, signed=True, symmetric=config.w_symmetric, per_channel=config.w_per_channel
                ),
                layer.out_features,
            )
        )
        signed = layer.role == "top_input" or (layer.role == "first" and dense_signed)
        layer.aq = (
            None
            if ab == 32
            else ActQuantizer(
                QuantSpec(ab, signed=signed, symmetric=config.a_symmetric if signed else True)
            )
        )


def plan_report(towers: QuantizedDLRMTowers, config: DenseQuantConfig) -> dict:
    return {
        "config": config.to_json(),
        "first_last_policy": {
            "8bit": "first bottom layer and logit layer at W8A8",
            "same": "first and last layers at the requested bits",
            "fp32": "first bottom layer and logit layer left fp32",
        }[config.first_last],
        "signed_inputs": [
            layer.name for layer in towers.layers() if layer.aq is not None and layer.aq.spec.signed
        ],
        "layers": towers.layer_table(),
    }


class single_thread:
    """Context: run with one intra-op thread. The methods' inner loops multiply small matrices
    (a mini-batch through a 64-wide layer), where threads cost more than they give and, on a
    shared or oversubscribed CPU, can make each step tens of times slower."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)


def act_range(x: torch.Tensor, observer: str = "minmax", percentile: float = 99.99):
    """(lo, hi) of an activation tensor by the named observer."""
    if observer == "minmax":
        return minmax_range(x)
    if observer == "percentile":
        return percentile_range(x, percentile)
    if observer == "max_mean":
        return max_mean_range(x)
    raise ConfigError(
        f"Unknown activation observer {observer!r}; use 'minmax', 'percentile' or 'max_mean'."
    )


@torch.no_grad()
def calibrate_minmax(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    act_observer: str = "minmax",
    weights: bool = True,
    acts: bool = True,
) -> dict[str, torch.Tensor]:
    """Set min/max ranges on every quantizer; returns the fp32 layer inputs it observed."""
    with quant_disabled(towers):
        inputs = layer_inputs(towers, cache)
    for layer in towers.layers():
        if weights and layer.wq is not None:
            layer.wq.set_range(*minmax_range(layer.weight, layer.wq.spec.per_channel))
        if acts and layer.aq is not None:
            layer.aq.set_range(*act_range(inputs[layer.name], act_observer))
    return inputs
