"""A job's files in the blob store: uploaded inputs, results and step checkpoints.

    inputs/{job}/{field}                 uploaded media, as the request named them
    results/{job}/video.mp4, thumbnail.webp
    results/{job}/windows/{i}.mp4            window i of a long video, as soon as it is decoded
    checkpoints/{job}/e{epoch}-s{step}.npy   latents after `step` steps, written under lease `epoch`
    checkpoints/{job}/window-{i}.npy         window i's decoded frames (uint8), for the window after and the
                                             stitched video

Checkpoint keys carry the lease epoch, so a runner that lost its lease never overwrites the checkpoint the
new holder resumes from; the job row points at the one that counts.
"""

from __future__ import annotations

import io
import re
from typing import Literal

import numpy as np

from .storage import Store

Variant = Literal["video", "thumbnail"]
RESULT_FILES: dict[str, tuple[str, str]] = {
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
}
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FOLDERS = ("inputs", "results", "checkpoints")


def _id(job_id: str) -> str:
    if not _ID.fullmatch(job_id):
        raise KeyError(job_id)
    return job_id


class JobFiles:
    """The files of every job in `store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def put_input(self, job_id: str, name: str, data: bytes) -> str:
        """Store the request field `name`'s uploaded bytes; returns their key."""
        key = f"inputs/{_id(job_id)}/{name}"
        self.store.put(key, data)
        return key

    def result_key(self, job_id: str, variant: Variant) -> str:
        return f"results/{_id(job_id)}/{RESULT_FILES[variant][0]}"

    def put_result(self, job_id: str, video: bytes, thumbnail: bytes) -> dict[str, str]:
        """Store the MP4 and its thumbnail (the thumbnail first); returns their keys by variant."""
        keys = {}
        for variant, data in (("thumbnail", thumbnail), ("video", video)):
            keys[variant] = self.result_key(job_id, variant)
            self.store.put(keys[variant], data, RESULT_FILES[variant][1])
        return keys

    def put_checkpoint(self, job_id: str, epoch: int, step: int, latents: np.ndarray) -> str:
        """Store the latents after `step` steps (float32, exact); returns the key."""
        return self._put_array(f"checkpoints/{_id(job_id)}/e{epoch}-s{step}.npy", latents)

    def get_checkpoint(self, key: str) -> np.ndarray:
        return np.load(io.BytesIO(self.store.get(key)), allow_pickle=False)

    def window_key(self, job_id: str, window: int) -> str:
        return f"results/{_id(job_id)}/windows/{int(window)}.mp4"

    def window_frames_key(self, job_id: str, window: int) -> str:
        return f"checkpoints/{_id(job_id)}/window-{int(window)}.npy"

    def put_window(self, job_id: str, window: int, video: bytes, frames: np.ndarray) -> str:
        """Store window `window` of a long video: its frames (the marker that it is done), then its MP4;
        returns the MP4's key."""
        self._put_array(self.window_frames_key(job_id, window), frames)
        key = self.window_key(job_id, window)
        self.store.put(key, video, RESULT_FILES["video"][1])
        return key

    def _put_array(self, key: str, array: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        self.store.put(key, buffer.getvalue())
        return key

    def delete_checkpoints(self, job_id: str) -> None:
        """Remove every checkpoint of the job (it ended)."""
        self.store.delete_prefix(f"checkpoints/{_id(job_id)}/")

    def delete_all(self, job_id: str) -> None:
        """Remove every file of the job."""
        for folder in _FOLDERS:
            self.store.delete_prefix(f"{folder}/{_id(job_id)}/")
