"""A DiT replica over G = cfg·U devices of one node: G worker actors, one per GPU, running
`pusa_model.parallel.ParallelDiTStage` together (SPMD).

The devices come from the DiT deployment's Serve placement group (``placement_group_bundles``, one
bundle per rank, ``placement_group_strategy: STRICT_PACK``): Serve reserves the G bundles on one node
before it starts the replica, puts the replica (CPU only, no model) in bundle 0, and removes the group
with the replica. `DiTGroup` starts worker i in bundle i with whatever the bundle holds beyond the
replica's own share, so the bundles are the whole reservation.

Start-up: every worker loads the model (independently; the node-local checkpoint copy is shared), then
rank 0 names a TCP rendezvous (its node IP and a free port) and all join one torch.distributed group
(NCCL on CUDA, gloo on the CPU) and build the ``(cfg, 1, U)`` mesh. A step sends the same `StepInput`
(put in the object store once) to every worker; every rank computes the same latents, rank 0's come
back.

Failures. When a worker dies, the step in flight fails with that worker's `RayActorError`, which
reaches the router as one (so it retries the step, from the latents it holds); the replica kills the
other workers at once (an NCCL peer would otherwise wait in a collective for its timeout) and rebuilds
the group in the same bundles on its next call, fusing the LoRA combination it held. An error that is not a
lost worker (e.g. out of memory on one rank) is raised as it is, and the group is rebuilt too, since a
rank may have stopped between collectives. Only a failed rebuild marks the replica unhealthy, so that
Serve replaces it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pusa_model.errors import ConfigError, InvalidRequest
from pusa_model.loras import PUSA
from pusa_model.operations import StepInput

logger = logging.getLogger("ray.serve")

RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)
LOSS_GRACE_S = 5.0  # after one rank fails, how long to wait for the others' results (to tell a lost worker)


class DiTParallel(BaseModel):
    """App arg ``dit_parallel``: CFG parallel degree (1 or 2) times Ulysses degree = GPUs per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cfg: int = Field(default=1, ge=1, le=2)
    ulysses: int = Field(default=1, ge=1)

    @property
    def size(self) -> int:
        return self.cfg * self.ulysses


def worker_device() -> str:
    """This worker's torch device: its Ray-assigned GPU (Ray narrows ``CUDA_VISIBLE_DEVICES`` to it,
    so normally ``cuda:0``), else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        raise ConfigError("a DiT worker got no GPU: every placement_group_bundle of the DiT needs GPU: 1")
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    index = visible.index(ids[0]) if ids[0] in visible else int(ids[0])
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def worker_resources(bundle: dict[str, float], taken: dict[str, float]) -> dict:
    """Actor options for what `bundle` holds beyond `taken` (the replica's share of bundle 0)."""
    left = {k: v - taken.get(k, 0.0) for k, v in bundle.items()}
    left = {k: round(v, 6) for k, v in left.items() if v > 1e-6}
    options = {"num_cpus": left.pop("CPU", 0), "num_gpus": left.pop("GPU", 0)}
    if "memory" in left:
        options["memory"] = left.pop("memory")
    options["resources"] = left
    return options


@ray.remote
class DiTWorker:
    """Rank `rank` of a replica's group: one device, one full copy of the model."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.device = worker_device()
        self.stage = None
        self.steps_run = 0
        self.warm_ups: list[dict] = []  # the shapes it ran its warm-up step at

    def load(self, preset: str, loras: dict | None = None, lora_base: str = "disk") -> int:
        """Load the transformer and the LoRAs (no collective: ranks load at their own pace)."""
        from pusa_model.loras import LoraRegistry
        from pusa_model.pipeline import load_dit_stage, model_folder
        from pusa_model.presets import get_preset

        spec = get_preset(preset)
        self._loaded = load_dit_stage(model_folder(spec), spec, self.device, None,  # options: in `join`
                                      LoraRegistry.model_validate(loras or {}), lora_base)
        return os.getpid()

    def address(self) -> tuple[str, int]:
        """Rank 0: where the others meet it (node IP, a free port)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: tuple[str, int], cfg: int, ulysses: int, options: dict, loras: dict | None) -> None:
        """Collective: join the group, build the mesh and the parallel stage, fuse the combination `loras`."""
        import torch.distributed as dist

        from pusa_model.parallel import ParallelDiTStage, init_parallel_groups
        from pusa_model.transformer import DiTOptions

        host, port = address
        host = f"[{host}]" if ":" in host else host
        cuda = self.device.startswith("cuda")
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://{host}:{port}", rank=self.rank,
            world_size=self.world, timeout=RENDEZVOUS_TIMEOUT,
        )
        groups = init_parallel_groups(cfg, ulysses, device_type="cuda" if cuda else "cpu")
        loaded, self._loaded = self._loaded, None
        self.stage = ParallelDiTStage(loaded.transformer, groups, loaded.lora, DiTOptions(**options))
        if loras is not None:
            self.stage.set_loras(loras)

    def warm_up(self, shape: dict) -> None:
        """Collective: one step at `shape` (`DiTStage.warm_up`), every rank at once."""
        self.stage.warm_up(**shape)
        self.warm_ups.append(shape)

    def step(self, inp: StepInput) -> np.ndarray | None:
        out = self.stage.run(inp)
        self.steps_run += 1
        return out if self.rank == 0 else None  # every rank holds the same latents

    def set_loras(self, loras: dict[str, float]) -> bool:
        return self.stage.set_loras(loras)

    def stats(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "device": self.device, "steps_run": self.steps_run,
                "warm_ups": self.warm_ups, "attention": self.stage.attention,
                "lora_alpha": self.stage.lora_alpha, "loras": self.stage.loras, "fuses": self.stage.fuses,
                "resources": ray.get_runtime_context().get_assigned_resources()}


class DiTGroup:
    """The workers of one DiT replica, in the replica's placement group. Calls are serialised (the
    ranks must enter collectives in the same order)."""

    def __init__(self, preset: str, options: dict, layout: DiTParallel, loras: dict | None = None,
                 lora_base: str = "disk", warmup: list[dict] | None = None) -> None:
        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) != layout.size:
            found = "none" if pg is None else f"{len(pg.bundle_specs)} bundles"
            raise ConfigError(
                f"dit_parallel {layout.cfg}x{layout.ulysses} needs the DiT deployment to set "
                f"placement_group_bundles: {layout.size} bundles of one GPU each, with placement_group_strategy "
                f"STRICT_PACK (found {found})"
            )
        self.preset, self.options, self.layout = preset, options, layout
        self.lora_registry, self.lora_base = loras or {}, lora_base
        self.warmup = warmup or []  # shapes every (re)built group runs one step at before it takes calls
        self._pg: PlacementGroup = pg
        self._taken = {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
        self._workers: list = []
        self._lock = asyncio.Lock()
        self.loras: dict[str, float] | None = None  # the combination the ranks hold (a rebuild fuses it)
        self.failed: BaseException | None = None
        self.rebuilds = 0
        self._start()

    # -- start / stop ---------------------------------------------------------------------------

    def _start(self) -> None:
        """Start G workers in the bundles, load, join (blocking; raises if any rank fails)."""
        t0 = time.monotonic()
        world = self.layout.size
        workers = [
            DiTWorker.options(
                **worker_resources(self._pg.bundle_specs[i], self._taken if i == 0 else {}),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
            ).remote(i, world)
            for i in range(world)
        ]
        try:
            pids = ray.get([w.load.remote(self.preset, self.lora_registry, self.lora_base) for w in workers])
            address = ray.get(workers[0].address.remote())
            ray.get([
                w.join.remote(address, self.layout.cfg, self.layout.ulysses, self.options, self.loras)
                for w in workers
            ])
            for shape in self.warmup:
                ray.get([w.warm_up.remote(shape) for w in workers])
        except BaseException:
            self._kill(workers)
            raise
        self._workers = workers
        logger.info("DiT group of %d ranks (cfg %d x ulysses %d) ready in %.1f s: pids %s", world,
                    self.layout.cfg, self.layout.ulysses, time.monotonic() - t0, pids)

    @staticmethod
    def _kill(workers: list) -> None:
        for w in workers:
            ray.kill(w, no_restart=True)  # a dead one too: no error

    def shutdown(self) -> None:
        self._kill(self._workers)
        self._workers = []

    async def _ready(self) -> list:
        """The workers, rebuilt first if the group was lost; a failed rebuild marks the replica failed."""
        if not self._workers:
            try:
                await asyncio.to_thread(self._start)
                self.rebuilds += 1
            except BaseException as exc:
                self.failed = exc
                raise
        return self._workers

    async def _all(self, calls: list) -> list:
        """Results of one call per rank; on any failure the group is torn down and the error raised
        (a lost worker's `RayActorError` in preference, so that the router retries the step)."""
        futures = [asyncio.wrap_future(ref.future()) for ref in calls]
        done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        if not pending and all(f.exception() is None for f in done):
            return [f.result() for f in futures]
        if pending:  # a peer of a lost rank fails (gloo) or hangs (NCCL); collect what comes in time
            await asyncio.wait(pending, timeout=LOSS_GRACE_S)
        errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
        lost = [e for e in errors if isinstance(e, RayActorError)]
        for f in futures:  # the rest fail once their workers are killed: nobody waits for them
            f.add_done_callback(lambda f: f.cancelled() or f.exception())
        logger.warning("DiT group: rank(s) failed (%s); tearing the group down, rebuilt on the next call",
                       ", ".join(type(e).__name__ for e in errors))
        self.shutdown()
        raise (lost or errors)[0]

    # -- calls ----------------------------------------------------------------------------------

    async def step(self, inp: StepInput) -> np.ndarray:
        async with self._lock:
            workers = await self._ready()
            packed = ray.put(inp)  # latents and embeddings go to the object store once, not G times
            return (await self._all([w.step.remote(packed) for w in workers]))[0]

    async def set_loras(self, loras: dict[str, float]) -> bool:
        """Fuse the combination `loras` on every rank; whether weights were written. A LoRA the registry
        lacks is refused here (an error on the ranks would tear the group down)."""
        unknown = sorted(set(loras) - set(self.lora_registry) - {PUSA})
        if unknown:
            held = ", ".join(sorted(self.lora_registry)) or "none"
            raise InvalidRequest("loras", f"this DiT holds no LoRA {unknown[0]!r} (it holds: {held})")
        async with self._lock:
            fused = True
            if self._workers:
                fused = any(await self._all([w.set_loras.remote(loras) for w in self._workers]))
            self.loras = dict(loras)  # a rebuilt group fuses it when it starts
            return fused

    async def stats(self) -> list[dict]:
        async with self._lock:
            if not self._workers:
                return []
            return await self._all([w.stats.remote() for w in self._workers])
