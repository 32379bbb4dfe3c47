"""Timing that the benchmark can trust: the device is synchronised before a clock is read."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


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
