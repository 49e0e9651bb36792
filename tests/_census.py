"""What the forward leaves alive for the backward, by module: shared by tests/test_checkpointing.py
(selective checkpointing keeps less) and benchmarks/breakdown.py (the memory table).

Counted as storages created by operations during the forward (a dispatch mode records each
output's storage and the innermost module running; views and in-place results share an input's
storage and are not new) that are still alive when the forward has returned; each storage once,
the weights' storages left out. This sees what autograd keeps and what selective checkpointing
caches alike (autograd's saved-tensor hooks do not see inside a checkpointed layer). The mode
stays on through the backward: the checkpoint's replay must run under the same dispatch modes as
the forward.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

OUTSIDE_MODULES = "engine (LM head, loss)"
COUNTED_MODULES = ("Attention", "MLP", "RMSNorm", "DecoderLayer")  # class-name endings the census attributes to


class _Created(TorchDispatchMode):
    """Remembers (weakly) every storage an operation creates while ``recording``, with the innermost
    counted module running."""

    def __init__(self):
        super().__init__()
        self.created: list = []
        self.stack: list[str] = []
        self.recording = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.recording:
            where = self.stack[-1] if self.stack else OUTSIDE_MODULES
            # a view or in-place result shares an input's storage: not created here (a view of a
            # kept bf16 weight copy, made in an earlier step, is no activation)
            inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in inputs:
                    self.created.append((weakref.ref(t.untyped_storage()), where))
        return out


def saved_tensor_census(model: torch.nn.Module, forward: Callable[[], torch.Tensor],
                        backward: Callable[[torch.Tensor], None]) -> Counter:
    """Bytes ``forward()`` leaves alive for the backward, by the module whose forward created
    them (outside every counted module: :data:`OUTSIDE_MODULES`); then ``backward(loss)``."""
    mode = _Created()

    def enter(module, args):
        mode.stack.append(type(module).__name__)

    def leave(module, args, output):
        mode.stack.pop()

    handles = []
    for module in model.modules():
        if type(module).__name__.endswith(COUNTED_MODULES):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    by_module: Counter = Counter()
    try:
        with mode:
            loss = forward()
            mode.recording = False
            mode.stack.clear()
            gc.collect()
            seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
            for ref, where in mode.created:
                storage = ref()
                if storage is not None and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    by_module[where] += storage.nbytes()
            backward(loss)
    finally:
        for h in handles:
            h.remove()
    return by_module
