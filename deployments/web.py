"""The web page at ``/`` (static files in ``deployments/web``, no build step) and the route its heat map
draws from: ``POST /v1/videos/plan``, a create request's plan (the per-step, per-latent-frame timesteps
`plan_request` computes, as ``pusa generate --dry-run`` prints it), checked as a create is checked but
making no job; and ``GET /v1/loras``, the deployment's LoRA registry (names, default alphas, the fast one)
for the page's LoRA picker.

The page uses the public API only, so it works in front of any deployment. `WebRoutes` is a mixin of
the Router (Serve routes the methods of its bases); `web_routes` holds its routes for the Router's app
to include, and `web_files` the static files for it to mount at ``/web``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request, Security
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from pusa_model.errors import InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.presets import MODEL_NAME, Preset
from pusa_model.request_schema import LoraChoice

from .admission import Admission, ApiSettings, bearer
from .api_schema import VideoCreate, request_body, responses
from .openai_api import ApiError, read_submission

WEB_DIR = Path(__file__).resolve().parent / "web"
web_routes = APIRouter()


class PlanStep(BaseModel):
    step: int = Field(description="0-based step index")
    timesteps: list[float] = Field(description="the DiT's timestep of every latent frame at this step (0-1000)")
    sigma: float
    sigma_next: float
    frame_sigma_deltas: list[float] = Field(description="how far each latent frame moves in this step")


class PlanConditioning(BaseModel):
    latent_index: int
    multiplier: float = Field(description="noise multiplier: 0 keeps the frame, 1 leaves it free")
    source: Literal["image", "video"]
    image_index: int | None


class PlanWindow(BaseModel):
    frames: int
    new_frames: int = Field(description="frames it adds to the video (a later window's first ones are the overlap)")
    seed: int
    conditioning: list[PlanConditioning]


class VideoPlan(BaseModel):
    """``POST /v1/videos/plan``: what a create with the same body would run, as ``pusa generate --dry-run``
    prints it. ``seed`` is the request's, else one drawn for this plan only."""

    object: Literal["video.plan"]
    task: str
    width: int
    height: int
    frames: int
    fps: int
    latent_frames: int
    latent_shape: list[int]
    seed: int
    guidance: float
    lora_alpha: float
    mode: Literal["standard", "fast"]
    boundary: float | None = Field(default=None, description="a two-expert model's (pusa-wan2.2) only: its boundary")
    guidance_2: float | None = Field(default=None, description="a two-expert model's only: the low-noise expert's guidance")
    lora_alpha_2: float | None = Field(default=None, description="a two-expert model's only: the low-noise expert's "
                                                                 "Pusa LoRA alpha")
    loras: list[LoraChoice] = Field(description="the LoRAs fused beside the Pusa LoRA, as the registry resolves them")
    cfg_passes_per_step: int
    conditioning: list[PlanConditioning]
    video_frames_needed: int
    steps: list[PlanStep]
    cost_gpu_s: float = Field(description="the estimate a create would be admitted and charged with")
    window_frames: int | None = Field(default=None, description="a long video's window length (only then)")
    windows: list[PlanWindow] | None = Field(
        default=None, description="a long video's windows, in order; the fields above (but frames) are the first's")


class LoraInfo(BaseModel):
    object: Literal["lora"]
    name: str = Field(description="what a request's loras[i].name names")
    alpha: float = Field(description="its strength when the request gives none")
    fast: bool = Field(description="the LoRA that mode 'fast' adds")


class LoraList(BaseModel):
    """``GET /v1/loras``: the LoRAs of this deployment's registry, fused beside the Pusa LoRA on request."""

    object: Literal["list"]
    data: list[LoraInfo]


def web_files() -> StaticFiles:
    return StaticFiles(directory=WEB_DIR)


@web_routes.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page (its scripts and styles are under ``/web``)."""
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


class WebRoutes:
    """The Router's ``/v1/videos/plan`` (it provides the attributes below and the create path's checks:
    ``_generation_data``, ``_plan``, ``_options``, ``_check_media``)."""

    settings: ApiSettings
    admission: Admission
    preset: Preset
    presets: dict[str, Preset]  # the models served, by name
    registries: dict[str, LoraRegistry]  # each model's LoRA registry

    @web_routes.post("/v1/videos/plan", response_model=None, responses=responses(VideoPlan, 400, 404, 409, 413, 503),
                     openapi_extra=request_body(VideoCreate))
    async def plan(self, request: Request,
                   credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """The plan of a create request (same body, same checks: fields, cost limit, media), without
        making a job or charging a quota: sizes, conditioning and every step's per-frame timesteps."""
        caller = await self.admission.caller(credentials)
        sub = await read_submission(request, self.settings.max_upload_bytes)
        data = await self._generation_data(sub, caller)
        try:
            plan = self._plan(sub, data)
            await self._options(sub)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        cost = self.admission.price(plan, self.presets[sub.model])
        try:
            await self._check_media(plan, sub.media)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        return {"object": "video.plan", **plan.describe(), "cost_gpu_s": round(cost, 3)}

    @web_routes.get("/v1/loras", response_model=None, responses=responses(LoraList, 503))
    async def list_loras(self, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> dict:
        """The LoRAs a Pusa V1 request may name in ``loras`` (and the one ``mode: "fast"`` adds), with their
        default alphas; their files are the deployment's business and are not listed."""
        await self.admission.caller(credentials)
        registry = self.registries[MODEL_NAME]
        return {"object": "list", "data": [{"object": "lora", "name": name, "alpha": entry.alpha, "fast": entry.fast}
                                           for name, entry in registry.root.items()]}
