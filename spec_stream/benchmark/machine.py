"""The machine a report was measured on: device, library versions, CPU and threads."""
from __future__ import annotations

import platform

import torch
import transformers


def cpu_l3() -> str:
    """The last-level cache of CPU 0 as the kernel reports it ("480 MiB"), or "L3 unknown":
    what fits in it decides whether a small model's step streams from memory."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as size:
            kib = int(size.read().strip().rstrip("K"))
        return f"{kib // 1024} MiB" if kib >= 1024 else f"{kib} KiB"
    except (OSError, ValueError):
        return "L3 unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "l3_cache": cpu_l3(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
