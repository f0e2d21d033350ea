"""The batch pipeline's stages, as Ray Data map functions over rows ``{"custom_id", "payload"}``.

A payload is a pickled dict that grows as the row moves on: its request and seed (`prepare`), the clean
conditioning latents (`Conditioning`), the prompt embeddings (`TextEncoding`), the final latents
(`Denoising`) and at last its record (`Decoding`). A row that failed carries ``error`` instead and
passes every later stage untouched. Each stage runs the service's own code: `read_row` (the API's
`Submission` and `plan_request`) for the request, `encode_conditioning`, `run_step` for every DiT step,
`decode_video_files` (the MP4 encoded as the frames decode).

A long video (more frames than a window) is conditioned for its first window; the DiT actor runs every
window, decoding each but the last and encoding its end as the next one's conditioning (with a VAE it loads
for the first such row), and the decode stage stitches the windows' frames.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from deployments.devices import pick_device
from deployments.dit_group import run_step
from deployments.vae import plan_from_job
from pusa_model import media
from pusa_model.errors import InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.pipeline import (decode_video_files, encode_conditioning, encode_extension, load_dit_stage,
                                 load_text_stage, load_vae_stage, model_folder, stitch_windows)
from pusa_model.presets import get_preset
from pusa_model.transformer import DiTOptions

from .outputs import BatchOutputs
from .rows import read_row

def pack(payload: dict) -> bytes:
    return pickle.dumps(payload, protocol=5)


def unpack(row: dict) -> dict:
    return pickle.loads(row["payload"])


def failed(custom_id: str, field: str | None, message: str) -> dict:
    return {"custom_id": custom_id, "status": "failed", "error": {"param": field, "message": message}}


def prepare(row: dict, preset: str, base: str | None, loras: dict | None = None) -> dict:
    """A manifest row (``{"custom_id", "row": <its JSON>}``) as the HTTP API would read it: checked,
    planned (its seed fixed, its LoRAs resolved against the registry `loras`), media read."""
    custom_id = row["custom_id"]
    fields = json.loads(row["row"])
    fields.pop("custom_id", None)
    started = time.perf_counter()
    try:
        plan, media_read = read_row(fields, get_preset(preset), base, LoraRegistry.model_validate(loras or {}))
    except InvalidRequest as exc:
        return {"custom_id": custom_id, "payload": pack(failed(custom_id, exc.field, str(exc)))}
    payload = {"custom_id": custom_id, "request": plan.request.model_dump(), "seed": plan.seed, "media": media_read,
               "timings_s": {"prepare": round(time.perf_counter() - started, 4)}}
    return {"custom_id": custom_id, "payload": pack(payload)}


class _Stage:
    """A map function over batches of rows that runs `process` on each row that has not failed; an
    `InvalidRequest` from it fails only that row."""

    name = ""

    def __init__(self, nice: int = 0) -> None:
        if nice:
            os.nice(nice)  # this actor's process yields the CPU to the online replicas on its node

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"custom_id": [], "payload": []}
        for custom_id, raw in zip(batch["custom_id"], batch["payload"]):
            payload = pickle.loads(raw)
            if "error" not in payload:
                started = time.perf_counter()
                try:
                    payload = self.process(payload)
                except InvalidRequest as exc:
                    payload = failed(str(custom_id), exc.field, str(exc))
                else:
                    payload["timings_s"][self.name] = round(time.perf_counter() - started, 4)
            out["custom_id"].append(str(custom_id))
            out["payload"].append(pack(payload))
        return out

    def process(self, payload: dict) -> dict:
        raise NotImplementedError


class Conditioning(_Stage):
    """VAE-encodes a row's images or clip into clean latents (zeros for t2v)."""

    name = "conditioning"

    def __init__(self, preset: str, device: str | None = None, nice: int = 0) -> None:
        super().__init__(nice)
        spec = get_preset(preset)
        self.preset = preset
        self.stage = load_vae_stage(model_folder(spec), spec, pick_device(device))

    def process(self, payload: dict) -> dict:
        plan = plan_from_job(payload["request"], payload["seed"], self.preset).windows[0]
        payload["clean"] = encode_conditioning(self.stage, plan, payload.pop("media")).numpy()  # media limits apply
        return payload


class TextEncoding(_Stage):
    """Prompt embeddings; a batch's repeated prompts (and the common negative prompt) are encoded once."""

    name = "text"

    def __init__(self, preset: str, device: str | None = None, cache_size: int = 64, nice: int = 0) -> None:
        super().__init__(nice)
        spec = get_preset(preset)
        self.stage = load_text_stage(model_folder(spec), spec, pick_device(device))
        self.cache: OrderedDict[tuple[str, str | None], tuple] = OrderedDict()
        self.cache_size = cache_size

    def process(self, payload: dict) -> dict:
        request = payload["request"]
        key = (request["prompt"], request["negative_prompt"] if request["guidance"] != 1.0 else None)
        if key not in self.cache:
            positive, negative = self.stage.encode(*key)
            self.cache[key] = (positive.numpy(), None if negative is None else negative.numpy())
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        payload["text"] = self.cache[key]
        return payload


class Denoising(_Stage):
    """Every DiT step of a row, one row at a time; the LoRAs are re-fused only when a row's combination
    differs from the last one's (the driver orders rows by combination)."""

    name = "denoise"

    def __init__(self, preset: str, device: str | None = None, dit_options: dict | None = None, nice: int = 0,
                 loras: dict | None = None, lora_base: str = "disk") -> None:
        super().__init__(nice)
        spec = get_preset(preset)
        self.preset, self.device = preset, pick_device(device)
        self.stage = load_dit_stage(model_folder(spec), spec, self.device, DiTOptions(**(dit_options or {})),
                                    LoraRegistry.model_validate(loras or {}), lora_base)
        self.vae = None  # loaded for the first long video
        self.refuses = 0

    def process(self, payload: dict) -> dict:
        plan = plan_from_job(payload["request"], payload["seed"], self.preset)
        if self.stage.set_loras(plan.lora_combination):
            self.refuses += 1
        clean, text = payload.pop("clean"), payload.pop("text")
        first, *later = plan.windows
        latents = self._denoise(first, clean, text)
        windows: list[np.ndarray] = []
        for window in later:  # a long video: decode the window before, condition this one on its end
            windows.append(media.frames_to_uint8(self._vae().decode(torch.from_numpy(latents))))
            latents = self._denoise(window, encode_extension(self._vae(), window, windows[-1]).numpy(), text)
        payload["latents"] = latents
        if windows:
            payload["windows"] = windows  # the frames of every window but the last
        return payload

    def _denoise(self, plan, clean: np.ndarray, text) -> np.ndarray:
        req, latents = plan.request, None
        sigmas, multipliers = plan.sigmas.tolist(), plan.multipliers.tolist()
        for k in range(req.steps):
            latents = run_step(self.stage, latents, clean if k == 0 else None, plan.seed, k, sigmas, multipliers, text,
                               req.guidance, req.mode)
        return latents

    def _vae(self):
        if self.vae is None:
            spec = get_preset(self.preset)
            self.vae = load_vae_stage(model_folder(spec), spec, self.device)
        return self.vae


class Decoding(_Stage):
    """Decodes a row's latents, stores its MP4 and thumbnail, then its record (which makes it complete)."""

    name = "decode"

    def __init__(self, preset: str, output: str, device: str | None = None, nice: int = 0) -> None:
        super().__init__(nice)
        spec = get_preset(preset)
        self.stage = load_vae_stage(model_folder(spec), spec, pick_device(device))
        self.outputs = BatchOutputs(output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """The rows' records (failed rows' too, stored as well), as JSON."""
        out = super().__call__(batch)
        records = []
        for raw in out["payload"]:
            payload = pickle.loads(raw)
            record = payload if "error" in payload else payload["record"]
            self.outputs.write_record(record)
            records.append(record)
        return {"custom_id": out["custom_id"], "record": [pickle.dumps(r) for r in records]}

    def process(self, payload: dict) -> dict:
        fps, latents = payload["request"]["fps"], torch.from_numpy(payload.pop("latents"))
        if "windows" in payload:  # a long video: the windows before, then this last one
            frames = stitch_windows([*payload.pop("windows"), media.frames_to_uint8(self.stage.decode(latents))])
            files = media.video_files(frames, fps)
        else:  # the MP4 encodes as the frames decode
            files = decode_video_files(self.stage, latents, fps)
        uris = self.outputs.write_result(payload["custom_id"], *files)
        payload["record"] = {"custom_id": payload["custom_id"], "status": "completed", **uris, "seed": payload["seed"],
                             "timings_s": payload["timings_s"], "error": None}
        return payload


def record_of(row: dict[str, Any]) -> dict:
    return pickle.loads(row["record"])
