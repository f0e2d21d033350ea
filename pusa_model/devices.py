"""Which torch device a replica runs on, and how much of its memory the replica may take."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

logger = logging.getLogger("ray.serve")
GIB = 2**30


def pick_device(requested: str | None = None, memory_gib: float | None = None) -> str:
    """`requested` if given, else the GPU Ray assigned to this replica, else the CPU. On a GPU with
    `memory_gib`, this process's allocations are capped there (`cap_gpu_memory`)."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if memory_gib is not None:
        cap_gpu_memory(device, memory_gib)
    return device


def cap_gpu_memory(device: str, gib: float) -> float | None:
    """Cap the caching allocator of this process on `device` at `gib` GiB, as on a card that size (an A6000
    replica emulated on a larger GPU; replicas sharing one card kept apart): an allocation past it raises
    ``torch.OutOfMemoryError`` as the smaller card would. Returns the fraction of the card set, or None on
    a device that is not a GPU (nothing to cap)."""
    if gib <= 0:
        raise ValueError(f"a GPU memory cap must be positive, got {gib} GiB")
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if dev.index is None:  # "cuda": the current card (set_per_process_memory_fraction needs an index)
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    logger.info("GPU memory capped at %.1f GiB (%.3f of %.1f GiB)", gib, fraction, total / GIB)
    return fraction


def gpu_memory() -> dict[str, int] | None:
    """This process's GPU memory (bytes): allocated and reserved now, the peaks of both, and the card's total;
    None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
            "total": torch.cuda.get_device_properties(0).total_memory}


def release_on_oom(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)`. On ``torch.OutOfMemoryError`` the memory its tensors held goes back to the card
    (the error's frames released, the allocator's cache emptied) before the error is raised again, so the
    replica takes its next request with its memory free rather than held by a failed one."""
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError as exc:
        message = str(exc)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise torch.OutOfMemoryError(message)
