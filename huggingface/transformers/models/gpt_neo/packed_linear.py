"""Linear layers whose cost hardly grows from one row to a few, for decoding on a CPU.

A tree step multiplies each weight by a few rows (the tree's nodes, the stream rows). MKL's
GEMM, which ``F.linear`` calls for fp32 on x86, costs about in proportion to the rows at
that size; oneDNN's, with the weight packed once (``torch.ops.mkldnn._reorder_linear_weight``),
stays almost flat. Measured on a 2-core AMD EPYC (32 MiB L3), microseconds per product at
1 / 4 / 16 rows: 8192 x 256 (the LM head) ``F.linear`` 141 / 446 / 828, packed 68 / 73 / 185;
1024 x 256: 18 / 52 / 85 against 20 / 20 / 34. A 256 x 256 product at one row alone costs
more packed (15 against 5, oneDNN's fixed cost per call), yet inside a whole decoding step,
whose ~29 MB of weights do not stay in that L3, packing every product paid at every size
(small model, compiled, alternating runners, ms per step: the one-token step 3.20 with
``F.linear``, 2.94 with only the LM head packed, 2.33 with every product packed; a (2,2)
tree 6.51, 4.96, 4.51). So while decoding every fp32 product is packed.

Decoding turns it on with `packed_products` (`fixed_shape.FixedShapeDecoder` on a CPU);
training and plain forwards never see it. Each weight is packed once, on first use, and again
after it changes (its version counter moves: an optimizer step, an in-place op on the
parameter): a packed copy is a cache, never the source of truth. An edit through
``weight.data`` bypasses the version counter; after one, call `clear` (the project's own code
makes none). Packed copies take as much memory again as the fp32 weights they mirror. The product is a custom op, so ``torch.compile`` calls it
as one opaque kernel (inductor cannot take oneDNN's packed tensors as graph inputs).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import weakref

import torch
from torch import nn

PACK_ROWS_HINT = 16  # oneDNN packs for this many rows; measured as fast as an exact hint for 1-64 rows,
# while a 1-row hint made 16-row products 2.6x slower (LM head, EPYC)

_enabled = False  # decoding runs on one thread: the flag is the process's
_handles = itertools.count()
_packed: dict[int, tuple[int, int, torch.Tensor]] = {}  # handle -> (data_ptr, version, packed weight)
_owners: dict[int, weakref.ref] = {}  # handle -> its layer (a deep copy of a layer gets a handle of its own)


@functools.cache  # asked on every step
def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepare(model: nn.Module) -> None:
    """Give each of ``model``'s linear layers its packing handle (never reused, so a new
    layer never meets an old packing; its packed weight goes when the layer goes)."""
    for module in model.modules():
        owner = _owners.get(getattr(module, "_packed_handle", -1))
        if isinstance(module, nn.Linear) and (owner is None or owner() is not module):
            module._packed_handle = handle = next(_handles)
            _owners[handle] = weakref.ref(module)
            weakref.finalize(module, forget, handle)


def forget(handle: int) -> None:
    _packed.pop(handle, None)
    _owners.pop(handle, None)


def clear() -> None:
    """Drop every packed copy (each is packed again on its next use)."""
    _packed.clear()


@contextlib.contextmanager
def packed_products(device: torch.device):
    """Within: `linear` takes packed products (on a CPU with oneDNN only),
    for the layers `prepare` has seen."""
    global _enabled
    previous, _enabled = _enabled, device.type == "cpu" and available()
    try:
        yield
    finally:
        _enabled = previous


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, as a packed product while `packed_products` is on."""
    weight = module.weight
    if not _enabled or not hasattr(module, "_packed_handle") or weight.dtype != torch.float32 \
            or x.device.type != "cpu" or weight.requires_grad and torch.is_grad_enabled():
        return module(x)
    return torch.ops.spec_stream.packed_linear(x, weight, module.bias, module._packed_handle)


@torch.library.custom_op("spec_stream::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN on ``weight`` packed (cached under ``handle``)."""
    if weight.is_inference():  # made under inference mode: no version counter to tell a change by
        return torch.nn.functional.linear(x, weight, bias)
    entry = _packed.get(handle)
    version = weight._version
    if entry is None or entry[0] != weight.data_ptr() or entry[1] != version:
        entry = _packed[handle] = (weight.data_ptr(), version,
                                   torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT))
    rows = x.numel() // x.shape[-1]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), entry[2], bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


@packed_linear.register_fake
def _(x, weight, bias, handle):
    return x.new_empty(*x.shape[:-1], weight.shape[0])

