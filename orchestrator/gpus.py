"""How many NVIDIA GPUs this process may use, without importing torch (the driver never does).

NVIDIA's NVML bindings (`nvidia-ml-py`, a Linux dependency) count the machine's GPUs; as CUDA does,
`CUDA_VISIBLE_DEVICES` narrows them to its entries up to the first invalid one (`-1` hides them all).
No driver, no library, no GPU: 0.
"""

from __future__ import annotations

import os


def machine_gpus() -> int:
    """The GPUs NVML sees on this machine; 0 without NVML or its driver."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def visible_gpus() -> int:
    """The GPUs a process started here would see: `torch.cuda.device_count()`, without torch."""
    present = machine_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not present:
        return present
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        count += 1
    return min(count, present)
