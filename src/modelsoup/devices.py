"""The machine's devices and memory: where evaluation runs by default, and how much memory is free."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """Where built-in evaluators run when no device is given: the current CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
