"""Shared helpers for benchmarks: machine facts and timing helpers."""
import os
import platform

import torch


def machine_info() -> dict:
    import qgait

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "qgait_isa": qgait.cpu_isa(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }
