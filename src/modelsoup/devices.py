"""The machine's devices and memory: where evaluation runs by default, and how much memory is free."""

from __future__ import annotations

import os

import torch

from .errors import OptionError


def resolve_device(device: str | torch.device | None, flag: str = "--device") -> torch.device:
    """The device asked for: ``cpu`` (None, the default), ``cuda`` or ``cuda:N``, checked to exist (merges and evaluation).

    Args:
        device: as given by the user.
        flag: how messages name the option (``--device``, ``--cuda``, ``device=``).

    Raises:
        OptionError: not a device name, a device other than cpu/cuda, CUDA not available, or no such GPU.
    """
    if device is None:
        return torch.device("cpu")
    where = f"{flag}{device!r}" if flag.endswith("=") else "--cuda (--device cuda)" if flag == "--cuda" else f"{flag} {device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"{where}: not a device; give cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise OptionError(f"{where}: a merge computes on the CPU or an NVIDIA GPU; give cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}, but no GPU is visible"
        raise OptionError(f"{where}: CUDA is not available here ({build}, torch {torch.__version__}). Merge on the CPU "
                          "(leave out the flag, or --device cpu), or run on a machine with an NVIDIA GPU and a CUDA build of torch")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise OptionError(f"{where}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}; give one of them")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


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
