"""Running a batch: the manifest's rows through the Ray Data stages, progress on the console and in
``status.json``, the output and error manifests at the end.

Stages run as actor pools sized and placed by `BatchSettings` (on a cluster: A6000 resources, as the
Serve profile). Execution streams: rows flow through the stages as they are ready and Ray Data holds
back what a slower stage has not taken yet, so memory stays bounded whatever the manifest's length.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import ray
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pusa_jobs.observability import metrics
from pusa_model.loras import LoraRegistry
from pusa_model.request_schema import GenerationRequest

from .outputs import CUSTOM_ID, BatchOutputs
from .payload import failed, record_of
from .sources import parent, read_manifest

STATUS_EVERY_S = 2.0


class StageResources(BaseModel):
    """One stage's actor pool: how many actors and what each holds."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = {}

    def placement(self) -> dict:
        """`map_batches` arguments: the pool and each actor's resources. (Ray Data restarts a lost actor
        and retries its rows on the new one by default.)"""
        return {"compute": ray.data.ActorPoolStrategy(size=self.concurrency), "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus, "resources": self.resources}


class BatchSettings(BaseModel):
    """`pusa batch --config`: the preset and every stage's pool (defaults: the tiny preset on the CPU). The
    preset's model is the batch's (`pusa_batch.rows`)."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"
    device: str | None = None  # None: each actor's GPU when it has one
    dit_options: dict = {}
    text_batch_size: int = Field(default=8, ge=1)
    # added to the stage actors' niceness (Ray starts its workers at 15; 19 is the lowest priority)
    nice: int = Field(default=0, ge=0, le=19)
    # LoRAs a row's `loras` and mode "fast" may use (the service's app arg `loras` unless set here), and
    # where the DiT actors keep the base weights they re-fuse from (pusa_model.pipeline.load_dit_stage)
    loras: LoraRegistry = LoraRegistry()
    lora_base: Literal["disk", "cpu", "device"] = "disk"
    conditioning: StageResources = StageResources()
    text: StageResources = StageResources()
    dit: StageResources = StageResources()
    decode: StageResources = StageResources()

    @classmethod
    def load(cls, path: Path | None) -> "BatchSettings":
        return cls.model_validate(yaml.safe_load(path.read_text()) or {}) if path else cls()


def _lora_key(row: dict) -> str:
    """The order rows run in: rows of one LoRA combination (Pusa alpha, mode, listed LoRAs) together, so
    that a DiT actor re-fuses rarely (a two-expert model's second alpha too)."""
    fields = GenerationRequest.model_fields
    return json.dumps([row.get("lora_alpha", fields["lora_alpha"].default), row.get("lora_alpha_2"),
                       row.get("mode", fields["mode"].default), row.get("loras", [])],
                      sort_keys=True, default=str)


def _checked_ids(rows: list[dict]) -> tuple[list[str | None], dict[int, dict]]:
    """Each row's custom_id, and the records of rows the driver fails at once (no or a repeated id)."""
    ids, errors, seen = [], {}, {}
    for n, row in enumerate(rows):
        custom_id = row.get("custom_id")
        if custom_id is None:
            errors[n] = failed(None, "custom_id", f"row {n + 1} has no custom_id")
        elif not CUSTOM_ID.match(str(custom_id)):
            errors[n] = failed(str(custom_id), "custom_id", "expected 1 to 128 letters, digits, '.', '_' or '-', "
                                                            "starting with a letter or digit")
        elif str(custom_id) in seen:
            errors[n] = failed(str(custom_id), "custom_id", f"row {n + 1} repeats the custom_id of row {seen[str(custom_id)] + 1}")
        else:
            seen[str(custom_id)] = n
        ids.append(None if custom_id is None else str(custom_id))
    return ids, errors


def build_dataset(rows: list[dict], output: str, settings: BatchSettings, base: str | None) -> ray.data.Dataset:
    """The pipeline over `rows`: prepare (CPU) → conditioning (VAE) → text → denoising (DiT) → decode and
    store (VAE)."""
    # The stages import the model code (torch, diffusers): only a process that runs a batch loads it, not
    # the Serve replicas that import this module for `BatchSettings`.
    from .stages import Conditioning, Decoding, Denoising, TextEncoding, prepare

    preset, device = settings.preset, settings.device
    context = ray.data.DataContext.get_current()  # one row per block: a row is a video's worth of work, and
    context.target_max_block_size = context.target_min_block_size = 1  # each streams on as soon as it is done
    items = [{"custom_id": row["custom_id"], "row": json.dumps(row, default=str)} for row in rows]
    loras = settings.loras.model_dump()
    ds = ray.data.from_items(items).map(prepare, fn_kwargs={"preset": preset, "base": base, "loras": loras})
    stages = [
        (Conditioning, {"preset": preset, "device": device}, settings.conditioning, 1),
        (TextEncoding, {"preset": preset, "device": device}, settings.text, settings.text_batch_size),
        (Denoising, {"preset": preset, "device": device, "dit_options": settings.dit_options, "loras": loras,
                     "lora_base": settings.lora_base}, settings.dit, 1),
        (Decoding, {"preset": preset, "output": output, "device": device}, settings.decode, 1),
    ]
    for stage, kwargs, pool, batch_size in stages:
        ds = ds.map_batches(stage, fn_constructor_kwargs={**kwargs, "nice": settings.nice}, batch_size=batch_size, batch_format="numpy",
                            **pool.placement())
    return ds


def run_batch(manifest: str, output: str, settings: BatchSettings, progress: bool = True,
              on_record: Callable[[dict], None] | None = None, local_media: bool = True) -> dict:
    """Generate every row of `manifest` not already complete under `output`; returns the summary.
    `on_record` sees each row's record as it ends (an exception from it stops the batch there). Media
    are paths (relative to the manifest), ``s3://`` URIs or data URLs; only data URLs without
    `local_media`."""
    started = time.monotonic()
    rows = read_manifest(manifest)
    outputs = BatchOutputs(output)
    ids, driver_errors = _checked_ids(rows)
    complete = {cid for cid, record in outputs.records().items() if record["status"] == "completed"}
    pending = sorted((dict(row, custom_id=cid) for n, (row, cid) in enumerate(zip(rows, ids))
                      if n not in driver_errors and cid not in complete), key=_lora_key)
    counts = {"total": len(rows), "skipped": len(rows) - len(pending) - len(driver_errors), "pending": len(pending),
              "completed": 0, "failed": 0}

    def status(state: str) -> dict:
        elapsed = time.monotonic() - started
        done = counts["completed"] + counts["failed"]
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (counts["pending"] - done) / rate if rate > 0 else None
        return {"state": state, **counts, "rows_per_s": round(rate, 4), "eta_s": None if eta is None else round(eta, 1),
                "elapsed_s": round(elapsed, 1), "updated_at": time.time()}

    rows_ended = metrics().batch_rows
    for _ in driver_errors:
        rows_ended.inc(tags={"batch": outputs.uri, "status": "failed"})
    outputs.write_status(status("running"))
    last_status = time.monotonic()
    with tqdm(total=len(pending), unit="row", disable=not progress, desc="pusa batch") as bar:
        if pending:
            for row in build_dataset(pending, output, settings, parent(manifest) if local_media else None).iter_rows():
                record = record_of(row)
                ended = "completed" if record["status"] == "completed" else "failed"
                counts[ended] += 1
                rows_ended.inc(tags={"batch": outputs.uri, "status": ended})
                bar.update(1)
                bar.set_postfix(failed=counts["failed"])
                if on_record is not None:
                    on_record(record)
                if time.monotonic() - last_status >= STATUS_EVERY_S:
                    outputs.write_status(status("running"))
                    last_status = time.monotonic()
    records = outputs.records()
    ordered = [driver_errors.get(n) or records.get(cid) for n, cid in enumerate(ids)]
    completed, failures = outputs.write_manifests([r for r in ordered if r is not None])
    summary = {**status("done"), "completed_total": completed, "failed_total": failures,
               "output": f"{outputs.uri}/output.jsonl", "errors": f"{outputs.uri}/errors.jsonl"}
    outputs.write_status(summary)
    return summary
