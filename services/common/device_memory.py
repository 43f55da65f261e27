"""How much memory a device has for this process (the input of the start-up fit check, services/common/fit.py).

- CUDA: `torch.cuda.mem_get_info` (free and total of the card), of which `fit.usable_bytes` is this
  process's share under `--gpu-memory-utilization`.
- CPU: `MemAvailable` of /proc/meminfo (what the kernel can hand out without swapping). It does not see a
  container's cgroup limit; where /proc/meminfo is missing (not Linux) the CPU is not checked.
- Other device types (mps, xpu): not checked (None).
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.fit import DeviceMemory, usable_bytes

MEMINFO = Path("/proc/meminfo")


def device_memory(device: str | torch.device, gpu_memory_utilization: float = 1.0) -> DeviceMemory | None:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return DeviceMemory(str(dev), free, total, usable_bytes(free, total, gpu_memory_utilization),
                            f"torch.cuda.mem_get_info, --gpu-memory-utilization {gpu_memory_utilization:g}")
    if dev.type == "cpu":
        return cpu_memory(MEMINFO)
    return None


def cpu_memory(meminfo: Path) -> DeviceMemory | None:
    """Host RAM from a /proc/meminfo-format file (values in kB), or None where there is none."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available, total = (int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "MemTotal"))
    except (OSError, KeyError, ValueError):
        return None
    return DeviceMemory("cpu", available, total, available, "MemAvailable of /proc/meminfo")
