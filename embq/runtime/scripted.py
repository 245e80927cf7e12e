"""`ScriptedCopy`: modules whose eager calls run a TorchScript copy of themselves; `CheckedLookups`:
the checked entry points that the lookup modules built on it share."""

from __future__ import annotations

from typing import Any

import torch

from embq.runtime.validate import run_checked


class ScriptedCopy:
    """Mixin for modules whose eager calls run a TorchScript copy of themselves
    (`scripted_copy()`: made on first use, and again after an attribute of the module is set;
    it shares the module's tensors, nothing is copied). torch.jit.fork runs tasks in parallel
    only inside TorchScript, and a scripted loop costs less per op than Python's. The copy is no
    part of the module's state, and scripting the module leaves it out."""

    __jit_ignored_attributes__ = ["_scripted"]
    _scripted: Any = None

    @torch.jit.unused
    def scripted_copy(self) -> Any:
        scripted = self.__dict__.get("_scripted")
        if scripted is None:
            # in __dict__, not registered as a submodule (setattr would register a Module)
            scripted = self.__dict__["_scripted"] = torch.jit.script(self)
        return scripted

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scripted"] = None  # copies and pickles script themselves again
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "_scripted" and self.__dict__.get("_scripted") is not None:
            self.__dict__["_scripted"] = None  # re-scripted on the next call, with the change


class CheckedLookups(ScriptedCopy):
    """Entry points of a lookup module (`RowwiseNBitBagCollection`, `CheckedTBE`) that has a
    `check` submodule (`embq.runtime.validate.SparseCheck`), a `threads` attribute and
    `_lookup(values, offsets, batch, threads)` for input the check passed.

    forward / lookup check the input first; `_lookup_checked_input` skips the check, for a
    caller that ran it already. Eager calls run the module's TorchScript copy on
    torch.get_num_threads() tasks; TorchScript cannot read that setting, so a scripted module
    uses its attribute `threads` (1 unless set on the loaded module).
    """

    @torch.jit.export
    def lookup(self, values: torch.Tensor, offsets: torch.Tensor, threads: int) -> torch.Tensor:
        """forward, with the work spread over up to `threads` tasks when the batch holds at least
        `parallel_min_ids` ids."""
        values, offsets, batch = self.check(values, offsets)
        return self._lookup(values, offsets, batch, threads)

    def _lookup_checked_input(self, values: torch.Tensor, offsets: torch.Tensor, batch: int) -> torch.Tensor:
        """The lookups of an input that `SparseCheck` passed (int64, B = `batch`)."""
        if not torch.jit.is_scripting():
            return self._eager_lookup(values, offsets, batch)
        return self._lookup(values, offsets, batch, self.threads)

    @torch.jit.unused
    def _eager_lookup(self, values: torch.Tensor, offsets: torch.Tensor, batch: int) -> torch.Tensor:
        # the scripted copy's per-call overhead is a fraction of Python's (CheckedTBE: ~12 us
        # against ~30 us of the TBEs' Python forward for 26 tables at batch 1)
        return self.scripted_copy()._lookup(values, offsets, batch, torch.get_num_threads())

    @torch.jit.unused
    def _eager_forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return run_checked(self.scripted_copy().lookup, values, offsets, torch.get_num_threads())

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Pooled lookups of the checked input (see the module's docstring)."""
        if not torch.jit.is_scripting():
            return self._eager_forward(values, offsets)
        return self.lookup(values, offsets, self.threads)
