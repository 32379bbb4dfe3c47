"""The packed products tree steps use on a CPU: the same numbers as `F.linear`, never stale."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from huggingface.transformers.models.gpt_neo import packed_linear

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this torch build has no oneDNN")


def layer(outputs: int, inputs: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(outputs + inputs)
    module = nn.Linear(inputs, outputs, bias=bias).requires_grad_(False)
    packed_linear.prepare(module)
    return module


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 41])
@pytest.mark.parametrize("shape", [(256, 64), (1024, 64, False)])
def test_packed_product_equals_linear(rows, shape):
    module = layer(*shape)
    x = torch.randn(1, rows, module.in_features)
    with packed_linear.packed_products(CPU):
        out = packed_linear.linear(module, x)
    assert module._packed_handle in packed_linear._packed  # the packed path ran
    torch.testing.assert_close(out, F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)


def test_changed_weights_are_packed_again():
    module = layer(128, 32)
    x = torch.randn(4, 32)
    with packed_linear.packed_products(CPU):
        before = packed_linear.linear(module, x)
        first = packed_linear._packed[module._packed_handle]
        module.weight.mul_(-2.0)  # as an optimizer step would: the version counter moves
        after = packed_linear.linear(module, x)
    assert packed_linear._packed[module._packed_handle][1] > first[1]  # packed again, from the new weight
    torch.testing.assert_close(after - module.bias, -2.0 * (before - module.bias), rtol=1e-5, atol=1e-5)


def test_a_layer_never_meets_another_layers_packing():
    first = layer(128, 32)
    handle = first._packed_handle
    with packed_linear.packed_products(CPU):
        packed_linear.linear(first, torch.randn(4, 32))
    del first
    assert handle not in packed_linear._packed  # its packed weight went with it
    original = layer(64, 32)
    copy = __import__("copy").deepcopy(original)  # the copy carries the attribute, not the handle
    packed_linear.prepare(copy)
    assert copy._packed_handle != original._packed_handle
    x = torch.randn(4, 32)
    copy.weight.mul_(0.5)
    with packed_linear.packed_products(CPU):
        torch.testing.assert_close(packed_linear.linear(original, x), F.linear(x, original.weight, original.bias))
        torch.testing.assert_close(packed_linear.linear(copy, x), F.linear(x, copy.weight, copy.bias))


def test_off_outside_decoding_and_under_autograd():
    module = layer(128, 32).requires_grad_(True)
    x = torch.randn(4, 32)
    assert packed_linear.linear(module, x).grad_fn is not None  # not enabled: module(x)
    with packed_linear.packed_products(CPU):
        out = packed_linear.linear(module, x)  # weights that train: never a packed copy
    out.sum().backward()
    assert module.weight.grad is not None
