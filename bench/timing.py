"""Timing shared by the benchmarks: CUDA events on a GPU (device work is asynchronous), the host clock on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def elapsed_seconds(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def median_seconds(step: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(elapsed_seconds(step, device) for _ in range(repeats))


def kernel_profile(step: Callable[[], object], device: torch.device, top: int = 0) -> dict:
    """Kernels launched and summed kernel time of one `step` on a GPU (empty on CPU): whether a step is bound by
    launches (GPU idle between small kernels) or by the kernels themselves."""
    if device.type != "cuda":
        return {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    kernels = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name, []).append(event.time_range.elapsed_us() / 1e3)
    heaviest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "kernels": len(kernels),
        "kernel_ms": sum(event.time_range.elapsed_us() for event in kernels) / 1e3,
        **({"top_kernels": [[name[:90], len(times), round(sum(times), 2)] for name, times in heaviest]} if top else {}),
    }
