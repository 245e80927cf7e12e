"""Fake-quant modules and the quantized-towers holder.

`QuantizedDLRMTowers` copies the two MLP towers of a TorchRec `DLRM` (`model.dense_arch.model`,
the bottom MLP, and `model.over_arch.model`, the top MLP) into `QuantLinear` layers, keeps the
model's embeddings (`sparse_arch`) frozen and unchanged, and recomputes the parameter-free dot
interaction. It is called like the DLRM, `towers(dense, kjt) -> logits [B, 1]`, and, for
calibration and evaluation, on cached pooled embeddings: `towers.forward_cached(dense, emb)`.

Quantization points: every Linear sees a quantized input (`aq`, an `ActQuantizer`) and a
quantized weight (`wq`, a `WeightQuantizer`); biases and the interaction stay fp32 (in a real
kernel the bias lives in the int32 accumulator), and the click logit is not quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from embq.dense.core.quantizers import (
    QuantSpec,
    dequantize,
    fake_quant,
    kernel_codes,
    qparams,
    quantize,
)
from embq.dense.core.windows import sparq_codes
from embq.errors import ConfigError


class WeightQuantizer(nn.Module):
    """Per-tensor or per-row quantizer of a Linear weight [out, in]."""

    def __init__(self, spec: QuantSpec, out_features: int) -> None:
        super().__init__()
        self.spec = spec
        rows = out_features if spec.per_channel else 1
        self.register_buffer("scale", torch.ones(rows, 1))
        self.register_buffer("zero_point", torch.zeros(rows, 1))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zp = qparams(lo.reshape(-1, 1), hi.reshape(-1, 1), self.spec)
        self.scale.copy_(scale.expand_as(self.scale))
        self.zero_point.copy_(zp.expand_as(self.zero_point))

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return quantize(w, self.scale, self.zero_point, self.spec)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.scale, self.zero_point, self.spec)


class ActQuantizer(nn.Module):
    """Per-tensor quantizer of a Linear's input; optionally SPARQ windows on its 8-bit codes.

    Codes are computed as fbgemm's int8 kernel computes them (`kernel_codes`), so that the
    simulated towers and the served int8 layers (embq.runtime.dense_layers) agree exactly.

    During BRECQ's activation pass the step size is learned (`start_learning`): the scale is
    exp(log_scale), a Parameter trained through the straight-through round (LSQ-style).
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.enabled = True
        self.log_scale: nn.Parameter | None = None
        self.sparq = None  # embq.dense.sparq.SparqSpec
        self.sparq_stats = None  # embq.dense.sparq.SparqStats while recording

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zp = qparams(
            torch.as_tensor(lo).reshape(1), torch.as_tensor(hi).reshape(1), self.spec
        )
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    def start_learning(self) -> nn.Parameter:
        self.log_scale = nn.Parameter(self.scale.detach().log().clone())
        return self.log_scale

    def stop_learning(self) -> None:
        if self.log_scale is not None:
            self.scale.copy_(self.log_scale.detach().exp())
        self.log_scale = None

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of `x` as the served int8 kernel computes them (`kernel_codes`), after
        SPARQ windows when configured."""
        q = kernel_codes(x, self.scale, self.zero_point, self.spec)
        if self.sparq is not None:
            windowed = sparq_codes(q, self.sparq, self.spec.signed)
            if self.sparq_stats is not None:
                self.sparq_stats.update(q, windowed, self.sparq, self.spec.signed)
            q = windowed
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.log_scale is not None:
            scale = self.log_scale.exp()
            return fake_quant(x, scale, self.zero_point, self.spec, ste=True)
        return dequantize(self.codes(x), self.scale, self.zero_point)


class QuantLinear(nn.Module):
    """Linear (+ ReLU) with an input quantizer and a weight quantizer.

    The weight used in the forward pass is, in order of precedence: `weight_fn()` while a method
    optimises it (AdaRound's soft rounding), the frozen integer `codes` after `freeze()`, the
    fake-quantized fp32 weight while calibrating, or the fp32 weight when `wq` is None.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        relu: bool,
        name: str,
        role: str = "hidden",
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().clone().float()
        self.register_buffer("bias", b)
        self.relu = relu
        self.name = name
        self.role = role
        self.wq: WeightQuantizer | None = None
        self.aq: ActQuantizer | None = None
        self.codes: torch.Tensor | None = None
        self.weight_fn: Callable[[], torch.Tensor] | None = None
        self.quantize_weight = True

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, relu: bool, name: str, role: str = "hidden"
    ) -> QuantLinear:
        return cls(linear.weight, linear.bias, relu, name, role)

    def qweight(self) -> torch.Tensor:
        if self.weight_fn is not None:
            return self.weight_fn()
        if self.wq is None or not self.quantize_weight:
            return self.weight
        if self.codes is not None:
            return dequantize(self.codes, self.wq.scale, self.wq.zero_point)
        return self.wq(self.weight)

    def weight_desc(self) -> tuple[int, str]:
        """(bits, grid) of the weight, (32, 'fp32') when unquantized."""
        if self.wq is None:
            return 32, "fp32"
        return self.wq.spec.bits, self.wq.spec.kind + (
            "/channel" if self.wq.spec.per_channel else "/tensor"
        )

    def freeze(self) -> None:
        """Fix the integer weight codes (from the current scales unless a method set them)."""
        if self.wq is not None and self.codes is None:
            self.codes = self.wq.codes(self.weight).detach()

    def unfreeze(self) -> None:
        self.codes = None

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        y = self.linear(x)
        return torch.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        wb = self.weight_desc()[0]
        ab = self.aq.spec.bits if self.aq is not None and self.aq.enabled else 32
        return f"{self.name}: {self.in_features}->{self.out_features}, W{wb}A{ab}, relu={self.relu}"


def _activation_is_relu(fn) -> bool:
    if fn is torch.relu or fn is F.relu or isinstance(fn, nn.ReLU):
        return True
    if isinstance(fn, nn.Identity):
        return False
    raise ConfigError(f"Dense quantization supports ReLU MLPs only, found activation {fn!r}.")


def tower_layers(module: nn.Module) -> list[tuple[nn.Linear, bool]]:
    """(Linear, followed-by-ReLU) pairs of a TorchRec MLP / Perceptron stack or nn.Sequential."""
    out: list[tuple[nn.Linear, bool]] = []

    def visit(m: nn.Module) -> None:
        if hasattr(m, "_linear") and hasattr(m, "_activation_fn"):  # torchrec Perceptron
            out.append((m._linear, _activation_is_relu(m._activation_fn)))
        elif isinstance(m, nn.Linear):
            out.append((m, False))
        elif isinstance(m, nn.ReLU):
            if not out:
                raise ConfigError("A ReLU before any Linear: not a DLRM tower.")
            out[-1] = (out[-1][0], True)
        elif isinstance(m, nn.Identity):
            pass
        else:
            children = list(m.children())
            if not children:
                raise ConfigError(f"Unsupported module {type(m).__name__} in a DLRM tower.")
            for c in children:
                visit(c)

    visit(module)
    if not out:
        raise ConfigError("Found no Linear layer in the tower.")
    return out


def _check_dlrm(model: nn.Module) -> None:
    for attr in ("sparse_arch", "dense_arch", "inter_arch", "over_arch"):
        if not hasattr(model, attr):
            raise ConfigError(
                f"Expected a TorchRec DLRM (with .{attr}); got {type(model).__name__}."
            )
    if not hasattr(model.inter_arch, "triu_indices"):
        raise ConfigError(
            "Only DLRM's dot interaction (InteractionArch) is supported, "
            f"found {type(model.inter_arch).__name__}."
        )


class QuantizedDLRMTowers(nn.Module):
    """The DLRM's bottom and top MLPs as fake-quant layers around the frozen embeddings.

    Args:
        bottom, top: the towers' layers in order.
        num_sparse_features: F, the number of pooled embeddings the interaction sees.
        sparse_arch: the model's embedding lookup (not part of `state_dict`), needed only to
            call the towers on KeyedJaggedTensors.
    """

    def __init__(
        self,
        bottom: list[QuantLinear],
        top: list[QuantLinear],
        num_sparse_features: int,
        sparse_arch: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.bottom = nn.ModuleList(bottom)
        self.top = nn.ModuleList(top)
        self.num_sparse_features = int(num_sparse_features)
        self.register_buffer(
            "triu",
            torch.triu_indices(
                self.num_sparse_features + 1, self.num_sparse_features + 1, offset=1
            ),
            persistent=False,
        )
        object.__setattr__(self, "sparse_arch", sparse_arch)  # frozen, outside the state dict
        self.info: dict = {}

    @classmethod
    def from_model(cls, model: nn.Module) -> QuantizedDLRMTowers:
        """An fp32 copy of `model`'s towers (no quantizers yet)."""
        _check_dlrm(model)
        bottom_l = tower_layers(model.dense_arch.model)
        top_l = tower_layers(model.over_arch.model)
        bottom = [
            QuantLinear.from_linear(lin, relu, f"bottom.{i}")
            for i, (lin, relu) in enumerate(bottom_l)
        ]
        top = [
            QuantLinear.from_linear(lin, relu, f"top.{i}") for i, (lin, relu) in enumerate(top_l)
        ]
        bottom[0].role = "first"
        top[0].role = "top_input"
        top[-1].role = "last"
        if top[-1].out_features != 1:
            raise ConfigError("The top MLP must end in one click logit.")
        towers = cls(bottom, top, int(model.inter_arch.F), model.sparse_arch)
        return towers

    def layers(self) -> Iterator[QuantLinear]:
        yield from self.bottom
        yield from self.top

    def layer(self, name: str) -> QuantLinear:
        for layer in self.layers():
            if layer.name == name:
                return layer
        raise KeyError(name)

    # --- the dense path -------------------------------------------------------------------
    def bottom_forward(self, dense: torch.Tensor) -> torch.Tensor:
        h = dense
        for layer in self.bottom:
            h = layer(h)
        return h

    def interact(self, bottom_out: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """DLRM's dot interaction: [bottom_out, upper-triangle dot products] (the top input)."""
        if self.num_sparse_features <= 0:
            return bottom_out
        combined = torch.cat((bottom_out.unsqueeze(1), emb), dim=1)
        inter = torch.bmm(combined, combined.transpose(1, 2))
        return torch.cat((bottom_out, inter[:, self.triu[0], self.triu[1]]), dim=1)

    def top_forward(self, top_in: torch.Tensor) -> torch.Tensor:
        h = top_in
        for layer in self.top:
            h = layer(h)
        return h

    def forward_cached(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1] from dense inputs [B, n_dense] and pooled embeddings [B, F, D]."""
        return self.top_forward(self.interact(self.bottom_forward(dense), emb))

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        if self.sparse_arch is None:
            raise ConfigError(
                "These towers have no embeddings attached: call attach_embeddings("
                "model) or use forward_cached(dense, pooled_embeddings)."
            )
        with torch.no_grad():
            emb = self.sparse_arch(sparse_features)
        return self.forward_cached(dense_features, emb)

    def attach_embeddings(self, model_or_sparse_arch: nn.Module) -> QuantizedDLRMTowers:
        sparse = getattr(model_or_sparse_arch, "sparse_arch", model_or_sparse_arch)
        object.__setattr__(self, "sparse_arch", sparse)
        return self

    # --- bookkeeping ------------------------------------------------------------------------
    def freeze(self) -> None:
        for layer in self.layers():
            layer.freeze()

    def set_act_quant(self, enabled: bool) -> None:
        for layer in self.layers():
            if layer.aq is not None:
                layer.aq.enabled = enabled

    def set_weight_quant(self, enabled: bool) -> None:
        for layer in self.layers():
            layer.quantize_weight = enabled

    def layer_table(self) -> list[dict]:
        rows = []
        for layer in self.layers():
            w_bits, w_grid = layer.weight_desc()
            rows.append(
                {
                    "name": layer.name,
                    "role": layer.role,
                    "in": layer.in_features,
                    "out": layer.out_features,
                    "relu": layer.relu,
                    "w_bits": w_bits,
                    "w_grid": w_grid,
                    "a_bits": layer.aq.spec.bits if layer.aq is not None else 32,
                    "a_grid": (layer.aq.spec.kind if layer.aq is not None else "fp32")
                    + (
                        f" + {layer.aq.sparq.name}"
                        if layer.aq is not None and layer.aq.sparq is not None
                        else ""
                    ),
                }
            )
        return rows

    def extra_repr(self) -> str:
        return f"F={self.num_sparse_features}, method={self.info.get('method')}"
