"""`ScriptedCopy`: modules whose eager calls run a TorchScript copy of themselves."""

from __future__ import annotations

from typing import Any

import torch


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

