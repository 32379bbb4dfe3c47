"""Devices and timing that the benchmark can trust: the device is synchronised before a clock is read."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from spec_stream.errors import UserError


def resolve_device(name) -> torch.device:
    """A ``--device`` value: ``auto`` (CUDA when visible, else the CPU), ``cpu``, ``cuda``
    or ``cuda:N``; a UserError for anything else or for CUDA where none is visible."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where work is synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall time per named section of a decode loop, the device synchronised around each
    section. Pass it as ``step_timer=`` to ``generate(speculative_streaming=True)`` or as
    ``timer=`` to `FixedShapeDecoder.generate`: the loop calls ``timer(name)`` as a context."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
