"""The batch pipeline's stages, as Ray Data map functions over rows ``{"custom_id", "payload"}``.

A payload is a pickled dict: the row's plan (`prepare`: the API's `Submission` and `plan_request`, through
`read_row`; planned once, here), its media, its timings, and the `State` its plan's operations
(`pusa_model.operations`) hand on. Each stage's actor executes its part of the operations with
`LocalEngine`, the in-process pipeline's executor: `Conditioning` the conditioning's encoding (none for
t2v), `TextEncoding` the text's, `Denoising` every step (and for a long video each window's decode and the
next window's conditioning, with a VAE it loads for the first such row), `Decoding` the rest (the video
decoded, or a long video's last window decoded and the windows stitched) and the row's record. A row that
failed carries ``error`` instead and passes every later stage untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from pusa_model.devices import pick_device
from pusa_model.engine import LocalEngine, State
from pusa_model.errors import InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.operations import EncodeConditioning, EncodeText, Operation, Operations
from pusa_model.pipeline import load_dit_stage, load_text_stage, load_vae_stage, model_folder
from pusa_model.presets import get_preset
from pusa_model.text import TextEncoderStage
from pusa_model.transformer import DiTOptions

from .outputs import BatchOutputs
from .payload import failed, pack
from .rows import read_row


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
    payload = {"custom_id": custom_id, "plan": plan, "media": media_read, "state": State(),
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

    engine: LocalEngine

    def part(self, ops: Operations) -> Sequence[Operation]:
        """The operations of a row's plan that this stage executes."""
        raise NotImplementedError

    def process(self, payload: dict) -> dict:
        plan = payload["plan"]
        self.engine.run(plan, payload["state"], self.part(plan.operations))
        return payload


def _model(preset: str):
    spec = get_preset(preset)
    return model_folder(spec), spec


class Conditioning(_Stage):
    """VAE-encodes a row's images or clip into clean latents (t2v has none)."""

    name = "conditioning"

    def __init__(self, preset: str, device: str | None = None, nice: int = 0) -> None:
        super().__init__(nice)
        self.engine = LocalEngine(vae=load_vae_stage(*_model(preset), pick_device(device)))

    def part(self, ops: Operations) -> Sequence[Operation]:
        return [op for op in ops if isinstance(op, EncodeConditioning)]

    def process(self, payload: dict) -> dict:
        self.engine.sources = payload.pop("media")  # the default media limits apply
        return super().process(payload)


class CachedText:
    """A text stage that keeps the embeddings of its last `size` prompt pairs, so that a batch's repeated
    prompts (and the common negative prompt) are encoded once."""

    def __init__(self, stage: TextEncoderStage, size: int) -> None:
        self.stage, self.size = stage, size
        self.cache: OrderedDict[tuple[str, str | None], tuple] = OrderedDict()

    def encode(self, prompt: str, negative: str | None) -> tuple:
        key = (prompt, negative)
        if key not in self.cache:
            self.cache[key] = self.stage.encode(prompt, negative)
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]


class TextEncoding(_Stage):
    """Prompt embeddings, through a `CachedText`."""

    name = "text"

    def __init__(self, preset: str, device: str | None = None, cache_size: int = 64, nice: int = 0) -> None:
        super().__init__(nice)
        self.engine = LocalEngine(text=CachedText(load_text_stage(*_model(preset), pick_device(device)), cache_size))

    def part(self, ops: Operations) -> Sequence[Operation]:
        return [op for op in ops if isinstance(op, EncodeText)]


class Denoising(_Stage):
    """Every DiT step of a row, one row at a time; the LoRAs are re-fused only when a row's combination
    differs from the last one's (the driver orders rows by combination)."""

    name = "denoise"

    def __init__(self, preset: str, device: str | None = None, dit_options: dict | None = None, nice: int = 0,
                 loras: dict | None = None, lora_base: str = "disk") -> None:
        super().__init__(nice)
        self.preset, self.device = preset, pick_device(device)
        self.stage = load_dit_stage(*_model(preset), self.device, DiTOptions(**(dit_options or {})),
                                    LoraRegistry.model_validate(loras or {}), lora_base)
        self.engine = LocalEngine(dit=self.stage)  # and a VAE, loaded for the first long video
        self.refuses = 0

    def part(self, ops: Operations) -> Sequence[Operation]:
        return ops[ops.denoising]

    def process(self, payload: dict) -> dict:
        plan = payload["plan"]
        experts = getattr(self.stage, "stages", (self.stage,))  # a two-expert model's: each fuses its own combination
        if any([stage.set_loras(plan.lora_combination_of(stage.expert)) for stage in experts]):
            self.refuses += 1
        if len(plan.windows) > 1 and self.engine.vae is None:
            self.engine.vae = load_vae_stage(*_model(self.preset), self.device)
        return super().process(payload)


class Decoding(_Stage):
    """Decodes a row's video, stores its MP4 and thumbnail, then its record (which makes it complete)."""

    name = "decode"

    def __init__(self, preset: str, output: str, device: str | None = None, nice: int = 0) -> None:
        super().__init__(nice)
        self.engine = LocalEngine(vae=load_vae_stage(*_model(preset), pick_device(device)))
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

    def part(self, ops: Operations) -> Sequence[Operation]:
        return ops[ops.denoising.stop:]

    def process(self, payload: dict) -> dict:
        files = super().process(payload).pop("state").files
        uris = self.outputs.write_result(payload["custom_id"], *files)
        payload["record"] = {"custom_id": payload["custom_id"], "status": "completed", **uris,
                             "seed": payload["plan"].seed, "timings_s": payload["timings_s"], "error": None}
        return payload
