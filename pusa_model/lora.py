"""LoRAs: load a file into diffusers names, and fuse any combination of LoRAs into the transformer.

A file holds Wan-named PEFT keys (``blocks.N.self_attn.q.lora_A.default.weight``) or the ComfyUI /
LightX2V form (``diffusion_model.`` prefix, ``lora_A``/``lora_B`` or ``lora_down``/``lora_up``, optional
``.alpha``, and ``.diff`` / ``.diff_b``: a parameter's whole delta, e.g. of a norm's weight or a bias).
The LoRA matrices are renamed by diffusers' Wan LoRA converter (``WanLoraLoaderMixin.lora_state_dict``)
after ``alpha / rank`` is folded into A in float32; the diff keys, which that converter drops for norms,
are renamed with diffusers' own Wan checkpoint mapping (``convert_wan_transformer_to_diffusers``) and kept
as ``<parameter>.diff``. Nothing in a file is dropped: a key that is neither is an error.

`LoraStack` holds named LoRAs and writes ``W0 + Σ alpha_i · ΔW_i`` into every parameter they touch
(ΔW = B @ A for the matrices, the diff itself for ``.diff``), always from the base weights ``W0`` (a
snapshot, or a `SafetensorsWeights` view of the checkpoint on disk), so switching combinations never
accumulates rounding error. Weights are written with ``copy_``, which re-quantizes a quantized weight
(`pusa_model.quantize`: fuse first, then quantize). `LoraFuser` is the one-LoRA form (the Pusa LoRA).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders import WanLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file

from .loras import PUSA  # the name of the preset's own LoRA in a stack


# A LoRA file's key: <module>.<lora matrix>, <module>.alpha, or <module>.diff / .diff_b (Wan names).
_FILE_KEY = re.compile(
    r"^(?P<module>[A-Za-z_][A-Za-z0-9_.]*?)\."
    r"(?:(?P<matrix>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|(?P<alpha>alpha)|(?P<diff>diff|diff_b))$"
)
_MATRIX = {"lora_A": "lora_A", "lora_down": "lora_A", "lora_B": "lora_B", "lora_up": "lora_B"}
# A loaded LoRA's key (diffusers names): the matrices, diffusers' bias form, or a whole-parameter diff.
_LOADED_KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<matrix>lora_A|lora_B)\.weight|(?P<bias>lora_B\.bias))$")
_DIFF_KEY = re.compile(r"^(?P<param>.+)\.diff$")


def load_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LoRA (``.pt``/``.pth`` or ``.safetensors``; PEFT, ComfyUI or LightX2V keys) and return it with
    diffusers names: ``blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` for the matrices (any
    ``alpha`` folded into A), ``blocks.0.norm2.weight.diff`` / ``blocks.0.attn1.to_q.bias.diff`` for diffs."""
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
        return convert_lora_state_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def convert_lora_state_dict(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`load_lora_state_dict` on a state dict in memory (PEFT, ComfyUI or LightX2V keys)."""
    comfy, diffs = _split_keys(raw)
    out = _convert_matrices(comfy) if comfy else {}
    out.update(_convert_diffs(diffs))
    return out


def _split_keys(raw: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The matrices in the ``diffusion_model.<module>.lora_A.weight`` form diffusers' converter reads (alpha
    folded into A, in float32), and the diffs by Wan parameter name; checks every module has A and B."""
    comfy: dict[str, torch.Tensor] = {}
    alphas: dict[str, torch.Tensor] = {}
    diffs: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in raw.items():
        m = _FILE_KEY.match(key.removeprefix("diffusion_model."))
        if m is None:
            unknown.append(key)
            continue
        module = m["module"]
        if m["matrix"]:
            new_key = f"diffusion_model.{module}.{_MATRIX[m['matrix']]}.weight"
            if new_key in comfy:
                raise ValueError(f"duplicate LoRA entry for {new_key!r} (key {key!r})")
            comfy[new_key] = value
        elif m["alpha"]:
            alphas[module] = value
        else:
            # Wan's bare parameters (a block's `modulation`, `head.modulation`) have no `.weight`.
            param = f"{module}.bias" if m["diff"] == "diff_b" else (
                module if module.rsplit(".", 1)[-1] == "modulation" else f"{module}.weight")
            if param in diffs:
                raise ValueError(f"duplicate LoRA diff for {param!r} (key {key!r})")
            diffs[param] = value
    if unknown:
        shown = ", ".join(repr(k) for k in sorted(unknown)[:5])
        raise ValueError(
            f"{len(unknown)} unsupported LoRA key(s), e.g. {shown}; expected Wan keys like "
            "'blocks.0.self_attn.q.lora_A.default.weight', 'diffusion_model.blocks.0.ffn.0.lora_down.weight', "
            "'….alpha', or '….diff' / '….diff_b'"
        )
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in comfy}
    for module in sorted(modules | set(alphas)):
        for matrix in ("lora_A", "lora_B"):
            if f"diffusion_model.{module}.{matrix}.weight" not in comfy:
                raise ValueError(f"LoRA module {module!r} has no {matrix} (down/up) weight")
    for module, alpha in alphas.items():
        if alpha.numel() != 1:
            raise ValueError(f"LoRA alpha of {module!r} must be a single number, got shape {tuple(alpha.shape)}")
        a_key, b_key = f"diffusion_model.{module}.lora_A.weight", f"diffusion_model.{module}.lora_B.weight"
        rank = comfy[a_key].shape[0]
        # diffusers would scale A and B by alpha/rank in the file's dtype; here it is done in float32.
        comfy[a_key] = comfy[a_key].float() * (float(alpha) / rank)
        comfy[b_key] = comfy[b_key].float()
    return comfy, diffs


def _convert_matrices(comfy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Wan LoRA converter on the matrices; it raises on a module it does not know."""
    try:
        converted = WanLoraLoaderMixin.lora_state_dict(comfy)
    except (KeyError, ValueError) as e:
        raise ValueError(f"diffusers' Wan LoRA converter refused the file: {type(e).__name__}: {e}") from None
    return {k.removeprefix("transformer."): v for k, v in converted.items()}


def _convert_diffs(diffs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan parameter names to diffusers' (``blocks.0.norm3.weight`` -> ``blocks.0.norm2.weight``), with
    diffusers' Wan checkpoint converter, as ``<name>.diff`` keys."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = {}
    for wan_name, value in diffs.items():
        (name,) = convert_wan_transformer_to_diffusers({wan_name: value})
        out[f"{name}.diff"] = value
    return out


@dataclass(frozen=True)
class _Delta:
    """One LoRA's change to one parameter: ``B @ A`` (low rank) or a whole `diff`."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    diff: torch.Tensor | None = None

    def on(self, device: torch.device) -> torch.Tensor:
        if self.diff is not None:
            return self.diff.to(device, torch.float32)
        return self.b.to(device, torch.float32) @ self.a.to(device, torch.float32)


def _parse_lora(lora: Mapping[str, torch.Tensor]) -> dict[str, _Delta]:
    """A loaded LoRA as ``{parameter name: delta}``, checking names and ranks."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, _Delta] = {}
    for key, value in lora.items():
        if (d := _DIFF_KEY.match(key)) is not None:
            out[d["param"]] = _Delta(diff=value)
            continue
        m = _LOADED_KEY.match(key)
        if m is None:
            raise ValueError(
                f"unexpected LoRA key {key!r}; expected '<module>.lora_A.weight', '.lora_B.weight', "
                "'.lora_B.bias' or '<parameter>.diff'"
            )
        if m["bias"]:
            out[f"{m['module']}.bias"] = _Delta(diff=value)
        else:
            pairs.setdefault(m["module"], {})[m["matrix"]] = value
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA module {module!r} needs both lora_A and lora_B, has only {sorted(ab)}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form B @ A")
        if f"{module}.weight" in out:
            raise ValueError(f"LoRA module {module!r} has both matrices and a weight diff")
        out[f"{module}.weight"] = _Delta(a=a, b=b)
    if not out:
        raise ValueError("the LoRA holds no weights")
    return out


def _owner(transformer: torch.nn.Module, name: str, low_rank: bool) -> tuple[torch.nn.Module, str]:
    """The module holding parameter `name` and the attribute name, checking a low-rank target is a Linear."""
    module_name, _, attr = name.rpartition(".")
    what = module_name if low_rank else name
    try:
        module = transformer.get_submodule(module_name) if module_name else transformer
    except AttributeError:
        raise ValueError(f"the LoRA targets {what!r}, which the transformer does not have") from None
    if low_rank and not isinstance(module, torch.nn.Linear):
        raise ValueError(f"the LoRA targets {module_name!r}, a {type(module).__name__}, not a Linear")
    if not isinstance(getattr(module, attr, None), torch.Tensor):
        raise ValueError(f"the LoRA targets {what!r}, which the transformer does not have")
    return module, attr


Combination = tuple[tuple[str, float], ...]


class LoraStack:
    """Named LoRAs fusable in any combination into `transformer`: each parameter any of them touches is
    written as ``W0 + Σ alpha_i · ΔW_i`` over the combination's LoRAs (in name order), from the base weights
    each time (``base_weights[name]``, e.g. ``blocks.0.attn1.to_q.weight``; when None, a snapshot of the
    targeted parameters taken now, on `base_device`, default the CPU). The LoRAs' own tensors stay where
    they are given (the CPU, as loaded) unless `lora_device` names where to keep them (e.g. the GPU, so
    that a switch moves nothing over PCIe)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        loras: Mapping[str, Mapping[str, torch.Tensor]],
        base_weights: Mapping[str, torch.Tensor] | None = None,
        base_device: str | torch.device = "cpu",
        lora_device: str | torch.device | None = None,
    ) -> None:
        self._deltas: dict[str, dict[str, _Delta]] = {}
        self._targets: dict[str, tuple[torch.nn.Module, str]] = {}
        for lora_name, lora in loras.items():
            try:
                deltas = _parse_lora(lora if lora_device is None else {k: v.to(lora_device) for k, v in lora.items()})
            except ValueError as e:
                raise ValueError(f"{e}" if len(loras) == 1 else f"LoRA {lora_name!r}: {e}") from None
            for name, delta in deltas.items():
                if name not in self._targets:
                    self._targets[name] = _owner(transformer, name, low_rank=delta.a is not None)
                module, attr = self._targets[name]
                shape = tuple(getattr(module, attr).shape)
                if delta.diff is not None and tuple(delta.diff.shape) != shape:
                    raise ValueError(f"the LoRA's diff for {name!r} is {tuple(delta.diff.shape)}, the parameter is {shape}")
                if delta.a is not None and (delta.b.shape[0], delta.a.shape[1]) != shape:
                    raise ValueError(
                        f"LoRA for {name.removesuffix('.weight')!r} has B @ A of shape {(delta.b.shape[0], delta.a.shape[1])}, "
                        f"but the weight is {shape} (out, in)"
                    )
            self._deltas[lora_name] = deltas
        if base_weights is None:
            base_weights = {name: self._param(name).detach().to(base_device, copy=True) for name in self._targets}
        missing = [name for name in self._targets if name not in base_weights]
        if missing:
            raise ValueError(f"base_weights lacks {len(missing)} targeted weight(s), e.g. {missing[0]!r}")
        self._base = base_weights
        self._current: Combination | None = None  # None: unknown (written in full at the first fuse)
        self.fuses = 0  # how many fuses wrote weights

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._deltas)

    @property
    def combination(self) -> dict[str, float] | None:
        """The fused combination (name -> alpha), or None before the first fuse."""
        return None if self._current is None else dict(self._current)

    def _param(self, name: str) -> torch.Tensor:
        module, attr = self._targets[name]
        return getattr(module, attr)  # looked up each time: a parameter may have been replaced

    def canonical(self, combination: Mapping[str, float] | Iterable[tuple[str, float]]) -> Combination:
        """`combination` as a sorted tuple of ``(name, alpha)``; an unknown name raises KeyError."""
        items = dict(combination)
        unknown = sorted(set(items) - set(self._deltas))
        if unknown:
            raise KeyError(f"unknown LoRA {unknown[0]!r} (known: {', '.join(self._deltas) or 'none'})")
        return tuple(sorted((name, float(alpha)) for name, alpha in items.items()))

    def _touched(self, combination: Combination) -> set[str]:
        return {p for name, alpha in combination if alpha != 0 for p in self._deltas[name]}

    @torch.no_grad()
    def fuse(self, combination: Mapping[str, float] | Iterable[tuple[str, float]], force: bool = False) -> bool:
        """Write ``W0 + Σ alpha_i · ΔW_i`` for `combination` (name -> alpha; alphas of 0 and LoRAs left out
        contribute nothing), computed in float32 on each weight's device. Only the parameters the old or the
        new combination touches are written; nothing is when the combination is already fused (unless
        `force`). Returns whether weights were written."""
        combo = self.canonical(combination)
        if combo == self._current and not force:
            return False
        touched = self._touched(combo)
        touched |= set(self._targets) if self._current is None or force else self._touched(self._current)
        terms = [(alpha, self._deltas[name]) for name, alpha in combo if alpha != 0]
        for name in self._targets:
            if name not in touched:
                continue
            param = self._param(name)
            w = self._base[name].to(param.device)
            if w.shape != param.shape:
                raise ValueError(f"base weight of {name!r} is {tuple(w.shape)}, the model's is {tuple(param.shape)}")
            parts = [(alpha, deltas[name]) for alpha, deltas in terms if name in deltas]
            if parts:
                w = w.to(torch.float32)
                for alpha, delta in parts:
                    w = w + alpha * delta.on(param.device)
            param.copy_(w)  # copy_, not .data: a quantized weight re-quantizes (pusa_model.quantize)
        self._current = combo
        self.fuses += 1
        return True


class LoraFuser:
    """Fuses one LoRA into `transformer` as ``W0 + alpha * ΔW`` (`LoraStack` with one LoRA), from the base
    weights each time (``base_weights[name]``, e.g. ``blocks.0.attn1.to_q.weight``; a CPU snapshot of the
    targeted weights when None)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        lora: dict[str, torch.Tensor],
        base_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.stack = LoraStack(transformer, {PUSA: lora}, base_weights)
        self._alpha: float | None = None

    @property
    def alpha(self) -> float | None:
        """The scale of the last `fuse`, or None before the first."""
        return self._alpha

    def fuse(self, alpha: float) -> None:
        """Set every targeted weight to ``W0 + alpha * ΔW``, computed in float32 on the weight's device;
        ``fuse(0.0)`` restores W0 exactly."""
        self.stack.fuse({PUSA: alpha}, force=True)
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
