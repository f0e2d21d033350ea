"""Which torch device a replica runs on."""

from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> str:
    """`requested` if given, else the GPU Ray assigned to this replica, else the CPU."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
