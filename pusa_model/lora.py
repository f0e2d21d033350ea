"""Pusa LoRA: load the released file into diffusers names and fuse it into the transformer at any scale.

The file holds Wan-named PEFT keys (``blocks.N.self_attn.q.lora_A.default.weight``) or the ComfyUI
form (``diffusion_model.`` prefix, ``lora_A``/``lora_B`` or ``lora_down``/``lora_up``, optional
``.alpha``). Key conversion is diffusers' own (``WanLoraLoaderMixin.lora_state_dict``).

`LoraFuser` writes ``W0 + alpha * (B @ A)`` into each targeted Linear, always from the base weight
``W0`` (a CPU snapshot, or a `SafetensorsWeights` view of the checkpoint on disk), so changing alpha
never accumulates rounding error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from diffusers.loaders import WanLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file

# The modules Pusa targets, in Wan names; anything else in a LoRA file is rejected.
_WAN_KEY = re.compile(
    r"^(?:diffusion_model\.)?"
    r"(?P<module>blocks\.\d+\.(?:self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02]))\."
    r"(?:(?P<matrix>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|alpha)$"
)
_MATRIX = {"lora_A": "lora_A", "lora_down": "lora_A", "lora_B": "lora_B", "lora_up": "lora_B"}
_DIFFUSERS_KEY = re.compile(r"^(?P<module>.+)\.(?P<matrix>lora_A|lora_B)\.weight$")


def load_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a Pusa LoRA (``.pt``/``.pth`` or ``.safetensors``, PEFT or ComfyUI keys) and return it with
    diffusers names, e.g. ``blocks.0.attn1.to_q.lora_A.weight``; any ``alpha`` is folded into A and B."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raw = load_file(str(path), device="cpu")
    elif path.suffix in (".pt", ".pth"):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: unsupported LoRA file type {path.suffix!r} (use .pt, .pth or .safetensors)")
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors, got {type(raw).__name__}")
    if not raw:
        raise ValueError(f"{path}: the LoRA file holds no tensors")
    try:
        comfy = _to_comfy_keys(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    converted = WanLoraLoaderMixin.lora_state_dict(comfy)
    return {k.removeprefix("transformer."): v for k, v in converted.items()}


def _to_comfy_keys(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan PEFT/ComfyUI keys to the ``diffusion_model.…lora_A.weight`` form diffusers' converter
    accepts, checking every key is a Pusa target and every module has both A and B."""
    out: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    unknown = []
    for key, value in raw.items():
        m = _WAN_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        suffix = f"{_MATRIX[m['matrix']]}.weight" if m["matrix"] else "alpha"
        new_key = f"diffusion_model.{m['module']}.{suffix}"
        if new_key in out:
            raise ValueError(f"duplicate LoRA entry for {new_key!r} (key {key!r})")
        out[new_key] = value
        modules.add(m["module"])
    if unknown:
        shown = ", ".join(repr(k) for k in sorted(unknown)[:5])
        raise ValueError(
            f"{len(unknown)} unsupported LoRA key(s), e.g. {shown}; expected Wan keys like "
            "'blocks.0.self_attn.q.lora_A.default.weight' for self_attn/cross_attn q,k,v,o and ffn.0/ffn.2"
        )
    for module in sorted(modules):
        prefix = f"diffusion_model.{module}"
        for matrix in ("lora_A", "lora_B"):
            if f"{prefix}.{matrix}.weight" not in out:
                raise ValueError(f"LoRA module {module!r} has no {matrix} (down/up) weight")
        alpha = out.get(f"{prefix}.alpha")
        if alpha is not None:
            if alpha.numel() != 1:
                raise ValueError(f"LoRA alpha of {module!r} must be a single number, got shape {tuple(alpha.shape)}")
            # diffusers scales A and B by alpha/rank in the file's dtype; do it in float32 instead.
            for matrix in ("lora_A", "lora_B"):
                out[f"{prefix}.{matrix}.weight"] = out[f"{prefix}.{matrix}.weight"].float()
    return out


def _pair_lora(lora: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group diffusers-named LoRA weights into ``{module: (A, B)}``, checking names and ranks."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        m = _DIFFUSERS_KEY.match(key)
        if m is None:
            raise ValueError(f"unexpected LoRA key {key!r}; expected '<module>.lora_A.weight' or '.lora_B.weight'")
        pairs.setdefault(m["module"], {})[m["matrix"]] = value
    if not pairs:
        raise ValueError("the LoRA holds no weights")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA module {module!r} needs both lora_A and lora_B, has only {sorted(ab)}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form B @ A")
        out[module] = (a, b)
    return out


class LoraFuser:
    """Fuses a LoRA into `transformer`'s Linear weights as ``W0 + alpha * (B @ A)``, from the base
    weights each time (``base_weights[name]``, e.g. ``blocks.0.attn1.to_q.weight``; a CPU snapshot
    of the targeted weights when None)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        lora: dict[str, torch.Tensor],
        base_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._targets: dict[str, tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]] = {}
        for module, (a, b) in _pair_lora(lora).items():
            try:
                linear = transformer.get_submodule(module)
            except AttributeError:
                raise ValueError(f"the LoRA targets {module!r}, which the transformer does not have") from None
            if not isinstance(linear, torch.nn.Linear):
                raise ValueError(f"the LoRA targets {module!r}, a {type(linear).__name__}, not a Linear")
            expected = (linear.out_features, linear.in_features)
            if (b.shape[0], a.shape[1]) != expected:
                raise ValueError(
                    f"LoRA for {module!r} has B @ A of shape {(b.shape[0], a.shape[1])}, "
                    f"but the weight is {expected} (out, in)"
                )
            self._targets[module] = (linear, a, b)
        if base_weights is None:
            base_weights = {
                f"{m}.weight": linear.weight.detach().to("cpu", copy=True)
                for m, (linear, _, _) in self._targets.items()
            }
        missing = [f"{m}.weight" for m in self._targets if f"{m}.weight" not in base_weights]
        if missing:
            raise ValueError(f"base_weights lacks {len(missing)} targeted weight(s), e.g. {missing[0]!r}")
        self._base = base_weights
        self._alpha: float | None = None

    @property
    def alpha(self) -> float | None:
        """The scale of the last `fuse`, or None before the first."""
        return self._alpha

    @torch.no_grad()
    def fuse(self, alpha: float) -> None:
        """Set every targeted weight to ``W0 + alpha * (B @ A)``, computed in float32 on the weight's
        device; ``fuse(0.0)`` restores W0 exactly."""
        for module, (linear, a, b) in self._targets.items():
            weight = linear.weight
            w = self._base[f"{module}.weight"].to(weight.device)
            if w.shape != weight.shape:
                raise ValueError(f"base weight of {module!r} is {tuple(w.shape)}, the model's is {tuple(weight.shape)}")
            if alpha != 0:
                delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
                w = w.to(torch.float32) + alpha * delta
            weight.copy_(w)
        self._alpha = float(alpha)


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Read-only view of a diffusers model folder's ``*.safetensors`` weights (single file or sharded
    with ``diffusion_pytorch_model.safetensors.index.json``); each lookup reads one tensor from disk."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: folder / file for name, file in weight_map.items()}
        else:
            self._files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), file))
        if not self._files:
            raise ValueError(f"{folder}: no safetensors weights found")

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._files[name]
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
