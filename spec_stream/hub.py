"""Is the Hugging Face hub reachable? One short connection attempt, so that an offline
machine hears at once what to do instead of after half a minute of the hub clients' retries."""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_SECONDS = 2.0  # one TCP connection to the hub; a reachable hub answers in well under that
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_mode() -> bool:
    """The user said offline: the hub clients then read only their local cache (no retries)."""
    return any(os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on") for flag in OFFLINE_FLAGS)


def hub_address() -> tuple[str, int]:
    """Host and port of ``$HF_ENDPOINT`` (default https://huggingface.co)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether one TCP connection to the hub opens within ``timeout`` seconds (asked once
    per process)."""
    try:
        socket.create_connection(hub_address(), timeout=timeout).close()
    except OSError:
        return False
    return True
