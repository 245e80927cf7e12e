"""The DLRM above the embeddings, re-run cheaply when one table's pooled output changes.

DLRM's interaction output is [bottom output, every pairwise dot product of (bottom, pooled
features)], and the top MLP starts with a Linear layer. When a few features' pooled embeddings
change, only the dot products that involve them change, so the first layer's pre-activation
moves by W[:, those columns] @ (new dots - old dots): no batched matrix product over all the
pairs and no full first layer (about 10x less work per evaluation on the demo model). The base
pre-activation is computed once through the model's own modules, and the incremental result is
checked against the model on a sample before it is used (`IncrementalTop.check`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embq.errors import ConfigError

CHUNK = 16384


class IncrementalTop:
    """Mean log loss of a TorchRec DLRM's top over calibration rows with some features' pooled
    embeddings replaced.

    Args:
        model: the float TorchRec DLRM (its inter_arch must be DLRM's dot interaction and its
            over_arch a ReLU MLP).
        bottom: float32 [N, D] bottom MLP outputs; pooled: float32 [N, F, D]; labels [N].
    """

    def __init__(self, model: torch.nn.Module, bottom: torch.Tensor, pooled: torch.Tensor,
                 labels: torch.Tensor) -> None:  # fmt: skip
        from embq.dense.core.fakequant import tower_layers

        self.model = model
        self.bottom, self.pooled, self.labels = bottom, pooled, labels
        self.layers = tower_layers(model.over_arch)
        first, self.first_relu = self.layers[0]
        n_feat = pooled.shape[1] + 1
        rows, cols = torch.triu_indices(n_feat, n_feat, offset=1)
        self.pair_rows, self.pair_cols = rows, cols
        width = bottom.shape[1]
        if first.in_features != width + len(rows):
            raise ConfigError("the top MLP does not take DLRM's dot interaction output")
        self.w_pairs = first.weight.detach()[:, width:]  # [H, pairs]
        # for one changed feature p: its pairs with every other input j, in j order
        pair_of = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(rows, cols))}
        self.single = []
        for p in range(1, n_feat):
            others = [j for j in range(n_feat) if j != p]
            idx = torch.tensor([pair_of[(min(p, j), max(p, j))] for j in others])
            self.single.append((torch.tensor(others), self.w_pairs[:, idx].T.contiguous()))
        with torch.no_grad():
            self.z1 = torch.cat([
                F.linear(model.inter_arch(dense_features=bottom[s : s + CHUNK],
                                          sparse_features=pooled[s : s + CHUNK]),
                         first.weight, first.bias)
                for s in range(0, len(labels), CHUNK)])  # fmt: skip

    def _rest(self, z1: torch.Tensor) -> torch.Tensor:
        x = torch.relu(z1) if self.first_relu else z1
        for linear, relu in self.layers[1:]:
            x = linear(x)
            if relu:
                x = torch.relu(x)
        return x.reshape(-1)

    def loss(self, changed: dict[int, torch.Tensor] | None = None) -> float:
        """Mean log loss (nats) with pooled[:, p] replaced by changed[p] ([N, D] each)."""
        changed = changed or {}
        total = 0.0
        with torch.no_grad():
            for s in range(0, len(self.labels), CHUNK):
                e = min(s + CHUNK, len(self.labels))
                z1 = self.z1[s:e]
                if changed:
                    z1 = z1 + self._delta({p: v[s:e] for p, v in changed.items()}, s, e)
                z = self._rest(z1)
                total += float(F.binary_cross_entropy_with_logits(
                    z.double(), self.labels[s:e].double(), reduction="sum"))  # fmt: skip
        return total / len(self.labels)

    def _delta(self, changed: dict[int, torch.Tensor], s: int, e: int) -> torch.Tensor:
        """Change of the first layer's pre-activation for rows s..e-1."""
        if len(changed) == 1:  # the common case: (v - old) . x_j for the other inputs j
            (p, v), = changed.items()
            others, w = self.single[p]
            diff = v - self.pooled[s:e, p]
            dots = torch.cat([(diff * self.bottom[s:e]).sum(-1, keepdim=True),
                              torch.einsum("nd,nfd->nf", diff, self.pooled[s:e])], 1)
            return dots[:, others] @ w
        old = torch.cat([self.bottom[s:e].unsqueeze(1), self.pooled[s:e]], 1)
        new = old.clone()
        for p, v in changed.items():
            new[:, p + 1] = v  # index 0 is the bottom output
        moved = {p + 1 for p in changed}
        cols = [k for k, (r, c) in enumerate(zip(self.pair_rows.tolist(), self.pair_cols.tolist()))
                if r in moved or c in moved]  # fmt: skip
        idx = torch.tensor(cols)
        r, c = self.pair_rows[idx], self.pair_cols[idx]
        d_new = (new[:, r] * new[:, c]).sum(-1)
        d_old = (old[:, r] * old[:, c]).sum(-1)
        return (d_new - d_old) @ self.w_pairs[:, idx].T

    def check(self, sample: int = 2048, atol: float = 1e-4) -> None:
        """The incremental path against the model's own forward on a sample, one feature
        changed; ConfigError if they disagree (a model this shortcut does not fit)."""
        n = min(sample, len(self.labels))
        g = torch.Generator().manual_seed(0)
        new = self.pooled[:n, 0] + 0.1 * torch.randn(n, self.pooled.shape[2], generator=g)
        pooled = self.pooled[:n].clone()
        pooled[:, 0] = new
        with torch.no_grad():
            want = self.model.over_arch(self.model.inter_arch(
                dense_features=self.bottom[:n], sparse_features=pooled)).reshape(-1)  # fmt: skip
            got = self._rest(self.z1[:n] + self._delta({0: new}, 0, n))
        if not torch.allclose(got, want, atol=atol, rtol=1e-4):
            raise ConfigError("the incremental top disagrees with the model's forward "
                              f"(max diff {float((got - want).abs().max()):.3g})")  # fmt: skip
