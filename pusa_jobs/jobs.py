"""Video jobs as the API shows them: ids, statuses, the job record and its OpenAI `Video` form."""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from pusa_model.request import GenerationPlan

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
ACTIVE: tuple[str, ...] = ("queued", "in_progress")
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
JOB_PREFIX = "video_"


def new_id(prefix: str, created_at: float | None = None) -> str:
    """`prefix` + 24 hex: the creation time in ms (12 hex) then 48 random bits, so ids sort by creation."""
    ms = int((time.time() if created_at is None else created_at) * 1000)
    return f"{prefix}{ms:012x}{secrets.token_hex(6)}"


def id_created_at(object_id: str, prefix: str) -> float:
    """The creation time an id made by `new_id` with `prefix` carries, in seconds; `ValueError` for other
    strings."""
    if not object_id.startswith(prefix) or len(object_id) != len(prefix) + 24:
        raise ValueError(f"not an id of {prefix}...: {object_id!r}")
    try:
        return int(object_id[len(prefix):len(prefix) + 12], 16) / 1000
    except ValueError:
        raise ValueError(f"not an id of {prefix}...: {object_id!r}") from None


def new_job_id(created_at: float | None = None) -> str:
    return new_id(JOB_PREFIX, created_at)


def job_created_at(job_id: str) -> float:
    """The creation time a job id carries, in seconds; `ValueError` for other strings."""
    return id_created_at(job_id, JOB_PREFIX)


def job_plan(plan: GenerationPlan, cost_gpu_s: float | None = None) -> dict:
    """The plan fields a job record keeps (sizes, seed, steps, the cost estimate) for views and for
    rebuilding the plan."""
    return {"width": plan.width, "height": plan.height, "frames": plan.frames, "fps": plan.request.fps,
            "seed": plan.seed, "steps": plan.request.steps, "windows": len(plan.windows), "task": plan.request.task,
            "latent_frames": plan.latent_frames, "cost_gpu_s": cost_gpu_s}


def _seconds(frames: int, fps: float) -> str:
    return f"{frames / fps:.2f}".rstrip("0").rstrip(".")


class Job(BaseModel):
    """One video generation job: a row of the ``jobs`` table. `request` and `plan` are the validated
    request and its resolved plan; `inputs` maps request fields to their uploaded files' keys."""

    id: str
    owner: str = ""
    created_at: float
    status: Status = "queued"
    progress: int = Field(default=0, ge=0, le=100)
    model: str = "pusa-v1"
    request: dict[str, Any]
    plan: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    extended_from: str | None = None
    webhook_url: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    version: int = 0
    lease_holder: str | None = None
    lease_epoch: int = 0
    lease_expires_at: float | None = None
    takeovers: int = 0
    adopted: bool = False
    checkpoint_step: int | None = None
    checkpoint_key: str | None = None
    cancel_requested: bool = False
    delete_requested: bool = False
    abandon_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_openai(self, queue_position: int | None = None) -> dict[str, Any]:
        """The OpenAI `Video` object, with Pusa's own fields under `pusa`.

        `cancelled` stays its own status: OpenAI's clients parse unknown enum values leniently.
        """
        plan = self.plan
        return {
            "id": self.id,
            "object": "video",
            "created_at": int(self.created_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "expires_at": None if self.expires_at is None else int(self.expires_at),
            "status": self.status,
            "progress": self.progress,
            "model": self.model,
            "prompt": self.request.get("prompt"),
            "seconds": _seconds(plan["frames"], plan["fps"]),
            "size": f"{plan['width']}x{plan['height']}",
            "error": self.error,
            "remixed_from_video_id": None,
            "pusa": {
                "task": self.request.get("task"),
                "seed": plan.get("seed"),
                "steps": plan.get("steps"),
                "windows": plan.get("windows", 1),  # a long video's chain of windows: steps x windows in all
                "frames": plan["frames"],
                "fps": plan["fps"],
                "queue_position": queue_position,
                "cost_gpu_s": plan.get("cost_gpu_s"),  # the estimate the job was admitted and charged with
                "extended_from": self.extended_from,
            },
        }
