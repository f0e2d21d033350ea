"""The LoRA registry of a deployment, and LoRA combinations as requests and replicas name them.

A registry (app arg ``loras``, `pusa generate --lora-registry`, `pusa batch --config`'s ``loras``) names the
LoRA files a deployment may fuse beside the Pusa LoRA, each with its default alpha; the one marked
``fast: true`` (e.g. LightX2V's step-distillation LoRA) is what a request in ``mode: "fast"`` adds::

    loras:
      lightx2v: {path: s3://pusa-models/loras/lightx2v_t2v_14b_cfg_step_distill.safetensors, alpha: 1.0, fast: true}
      style: {path: /mnt/loras/style.safetensors, alpha: 0.8}

A path is an ``s3://bucket/key`` (copied once per node), an absolute local file, or a file relative to the
model folder (the checkpoint's own copy, e.g. one uploaded beside ``pusa_v1.pt``). On a two-expert model
(Pusa-Wan2.2) every entry names a file per expert: ``path`` for the high-noise expert and ``path_2`` for the
low-noise one (Wan2.2-Lightning's 4-step LoRA ships as such a pair), fused at the entry's one alpha::

    loras:
      lightning: {path: lightning/high_noise_model.safetensors, path_2: lightning/low_noise_model.safetensors,
                  alpha: 1.0, fast: true}

A combination is what a DiT holds fused: ``{"pusa": lora_alpha, name: alpha, ...}``. Its id
(`combination_id`, e.g. ``distill=1.0,pusa=1.4``) is the Serve multiplexed model id that routes a request
to a replica holding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

PUSA = "pusa"  # the preset's own LoRA, at the request's lora_alpha
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no "," or "=": they separate a combination id
MAX_ALPHA = 5.0


class LoraEntry(BaseModel):
    """One registered LoRA file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(min_length=1, description="s3://bucket/key, an absolute file, or a file in the model folder "
                                                "(a two-expert model's high-noise expert's)")
    path_2: str | None = Field(default=None, min_length=1,
                               description="two-expert models: the low-noise expert's file (as path)")
    alpha: float = Field(default=1.0, ge=0.0, le=MAX_ALPHA, description="the strength when a request gives none")
    fast: bool = Field(default=False, description="the LoRA that mode 'fast' adds (at most one)")


class LoraRegistry(RootModel[dict[str, LoraEntry]]):
    """``{name: LoraEntry}``: the LoRAs a deployment holds beside the Pusa LoRA."""

    root: dict[str, LoraEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "LoraRegistry":
        import re

        for name in self.root:
            if name == PUSA:
                raise ValueError(f"{PUSA!r} is the Pusa LoRA (the preset's own); name the others differently")
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"LoRA name {name!r}: expected 1 to 64 letters, digits, '.', '_' or '-'")
        fast = [name for name, entry in self.root.items() if entry.fast]
        if len(fast) > 1:
            raise ValueError(f"only one LoRA may be fast: true, found {', '.join(fast)}")
        return self

    def __contains__(self, name: object) -> bool:
        return name in self.root

    def __iter__(self):  # names
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    def get(self, name: str) -> LoraEntry | None:
        return self.root.get(name)

    @property
    def fast(self) -> str | None:
        """The LoRA that mode ``fast`` adds, if one is configured."""
        return next((name for name, entry in self.root.items() if entry.fast), None)


def registries_by_model(loras: Mapping | None, wan22_loras: Mapping | None) -> dict[str, LoraRegistry]:
    """Each model's LoRA registry: Pusa V1's `loras` (a file an entry) and Pusa-Wan2.2's `wan22_loras` (a file
    per expert), as the app's arguments give them."""
    from .presets import MODEL_NAME, WAN22_MODEL_NAME

    return {MODEL_NAME: LoraRegistry.model_validate(loras or {}),
            WAN22_MODEL_NAME: LoraRegistry.model_validate(wan22_loras or {})}


def lora_path(path: str, model_folder: Path) -> Path:
    """The local file of a registry `path`: an ``s3://`` object copied once per node, an absolute file, or
    a file relative to `model_folder`."""
    from .loading import resolve_file

    if path.startswith("s3://") or Path(path).expanduser().is_absolute():
        return resolve_file(path)
    return resolve_file(str(Path(model_folder) / path))


def combination_id(combination: Mapping[str, float]) -> str:
    """The multiplexed model id of a combination: ``name=alpha`` pairs in name order, alphas exact."""
    return ",".join(f"{name}={float(alpha)!r}" for name, alpha in sorted(combination.items()))


def parse_combination_id(model_id: str) -> dict[str, float]:
    """`combination_id`'s inverse; an older runner's ``alpha=1.4`` is the Pusa LoRA at 1.4."""
    if model_id.startswith("alpha="):
        return {PUSA: float(model_id.removeprefix("alpha="))}
    out = {}
    for part in model_id.split(","):
        name, sep, alpha = part.partition("=")
        if not sep or not name or name in out:
            raise ValueError(f"malformed LoRA combination id {model_id!r}")
        out[name] = float(alpha)
    return out
