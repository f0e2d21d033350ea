"""8-bit fast paths of the DiT: SageAttention and torchao's INT8 / FP8 GEMMs. Both are opt-in.

**Attention** (``DiTOptions(attention="sage")``): SageAttention (INT8 QKᵀ, fp16 PV) through diffusers'
attention dispatcher. diffusers' own ``"sage"`` backend wants ``sageattention>=2.1.1``, which PyPI does
not carry (it is built from source); PyPI's ``sageattention`` 1.0.6 is the Triton version of the same
kernel (sm80/86/89/90). When diffusers can use the installed package, its ``"sage"`` backend is set;
otherwise 1.0.6's ``sageattn`` is registered in the dispatcher's slot for that kernel
(``_sage_qk_int8_pv_fp16_triton``) as an opaque custom op, so that ``torch.compile(fullgraph=True)``
keeps it whole, and the attention processors are pointed at it.

**GEMMs** (``DiTOptions(quantize="int8" | "fp8")``): torchao ``Int8DynamicActivationInt8WeightConfig``
(int8 weights per output channel, activations per token at run time; INT8 tensor cores, twice the bf16
rate on Ampere) or ``Float8DynamicActivationFloat8WeightConfig`` with per-row scales (e4m3; sm89+:
Ada, Hopper) on every ``nn.Linear`` of the transformer blocks: the embedders, the output head and the
modulation tables stay as loaded. Weights are quantized once, in place, when the options are applied.

**Fuse first, then quantize.** A LoRA is never added to quantized weights: writing a float weight
into a quantized one (``weight.copy_(w)``, what `pusa_model.lora.LoraFuser` does) re-quantizes `w`
with the same config, one Linear at a time. So a fuse at alpha on a quantized model leaves exactly the
weights that quantizing the model fused at alpha leaves, and a switch of alpha re-quantizes from
``W0 + alpha·BA``. Writers must use ``copy_``; assigning ``.data`` would drop the quantization.

Where a kernel cannot run (no CUDA, too old a GPU, missing package) the option falls back to the bf16
path and says why in a warning; a missing torchao for ``quantize`` is an error (`QuantizationError`).
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
from diffusers.models import attention_dispatch

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8", "fp8")
SAGE_HEAD_DIMS = (64, 96, 128)  # what SageAttention's kernels are built for
SAGE_V1_BACKEND = "_sage_qk_int8_pv_fp16_triton"  # the dispatcher's name for 1.0.6's kernel
INSTALL_HINT = "pip install 'pusa-serve[fast]'"


class QuantizationError(RuntimeError):
    """A configured quantization that cannot be applied at all (e.g. torchao missing)."""


# ----------------------------------------------------------------------------------------------------
# SageAttention


def _import_sage():
    """The installed ``sageattention`` module (raises ImportError; a seam for tests)."""
    return importlib.import_module("sageattention")


def sage_blocker(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why SageAttention cannot run for a DiT on `device` with `dtype` weights and `head_dim`, or None."""
    if device.type != "cuda":
        return f"SageAttention runs on CUDA GPUs only and the DiT is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"SageAttention needs compute capability 8.0 or newer (Ampere), this GPU is sm{major}{minor}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"SageAttention needs bf16 or fp16 weights, the DiT is {str(dtype).removeprefix('torch.')}"
    if head_dim not in SAGE_HEAD_DIMS:
        return f"SageAttention supports head dims {SAGE_HEAD_DIMS}, the DiT has {head_dim}"
    return sage_import_error()


def sage_import_error() -> str | None:
    """Why no usable ``sageattention`` imports here, or None when one does."""
    if attention_dispatch._CAN_USE_SAGE_ATTN:
        return None
    try:
        module = _import_sage()
    except ImportError as error:
        if getattr(error, "name", None) == "sageattention":
            return f"the sageattention package is not installed ({INSTALL_HINT})"
        return f"sageattention failed to import ({type(error).__name__}: {error})"
    if not hasattr(module, "sageattn"):
        return "the installed sageattention has no sageattn function"
    return None


def model_sage_blocker(model) -> str | None:
    attn = model.blocks[0].attn1
    weight = attn.to_q.weight
    head_dim = attn.inner_dim // attn.heads
    return sage_blocker(weight.device, weight.dtype, head_dim)


@torch.library.custom_op("pusa::sageattn_v1", mutates_args=())
def _sageattn_v1(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """sageattention 1.x ``sageattn`` on ``(B, S, H, D)`` tensors (its "NHD" layout), not causal.

    K is smoothed (mean over the sequence removed) by the caller, out of place, so the kernel's own
    in-place smoothing is off and no input is mutated.
    """
    sageattn = _import_sage().sageattn
    out = sageattn(query, key, value, tensor_layout="NHD", is_causal=False, sm_scale=scale, smooth_k=False)
    return out.contiguous()


@_sageattn_v1.register_fake
def _(query, key, value, scale):
    return query.new_empty(query.shape)


def _sage_v1_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor:
    """The dispatcher's backend function for sageattention 1.x (``(B, S, H, D)`` in and out)."""
    if attn_mask is not None or is_causal or return_lse:
        raise ValueError("the sageattention 1.x backend supports neither masks, causal attention nor lse")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    key = key - key.mean(dim=1, keepdim=True)  # K smoothing: softmax is invariant to it, INT8 QK is not
    return _sageattn_v1(query.contiguous(), key.contiguous(), value.contiguous(), float(scale))


def _register_sage_v1() -> attention_dispatch.AttentionBackendName:
    """Put 1.x's kernel in the dispatcher's ``_sage_qk_int8_pv_fp16_triton`` slot (whose own function
    needs sageattention>=2.1.1 and is unusable here); returns that name."""
    name = attention_dispatch.AttentionBackendName(SAGE_V1_BACKEND)
    registry = attention_dispatch._AttentionBackendRegistry
    if registry._backends.get(name) is not _sage_v1_attention:
        registry.register(name, constraints=[attention_dispatch._check_device_cuda])(_sage_v1_attention)
    return name


def enable_sage(model) -> str | None:
    """Point `model`'s attention at SageAttention and return the backend's name; when it cannot run,
    return None and leave the backend alone (the caller logs why: `model_sage_blocker`)."""
    if model_sage_blocker(model) is not None:
        return None
    if attention_dispatch._CAN_USE_SAGE_ATTN:  # sageattention >= 2.1.1: diffusers' own backend
        model.set_attention_backend("sage")
        return "sage"
    backend = _register_sage_v1()
    # model.set_attention_backend would refuse (its requirement check wants >= 2.1.1): set what it sets.
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = backend
    version = getattr(_import_sage(), "__version__", None) or _dist_version("sageattention")
    logger.info("SageAttention %s (Triton) registered as diffusers backend %r", version, backend.value)
    return backend.value


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------------------------------
# torchao GEMMs

_CONFIG_BY_TENSOR_TYPE: dict[type, object] = {}  # quantized weight class -> the config that made it


def gemm_blocker(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `mode` GEMMs cannot run for a DiT on `device` with `dtype` weights, or None."""
    if mode == "fp8":
        if device.type != "cuda":
            return f"FP8 GEMMs need a CUDA GPU of compute capability 8.9 or newer and the DiT is on {device.type}"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (
                f"FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper), this GPU is sm{major}{minor}"
                " (use quantize: int8 there)"
            )
        if dtype != torch.bfloat16:
            return f"FP8 row-wise GEMMs need bf16 weights, the DiT is {str(dtype).removeprefix('torch.')}"
    elif mode == "int8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return f"INT8 GEMMs need compute capability 8.0 or newer (Ampere), this GPU is sm{major}{minor}"
    return None


def _torchao_quantization():
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as error:
        raise QuantizationError(
            f"quantize needs torchao ({INSTALL_HINT}); importing it failed: {type(error).__name__}: {error}"
        ) from error


def torchao_config(mode: str):
    """The torchao config of `mode` (``int8`` or ``fp8``)."""
    ao = _torchao_quantization()
    if mode == "int8":
        # Not torchao's global inductor settings (coordinate-descent tuning of every kernel): only the
        # fusion of the int8 matmul with its scale, which touches no other graph.
        torch._inductor.config.force_fuse_int_mm_with_mul = True
        return ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if mode == "fp8":
        return ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow(), set_inductor_config=False)
    raise ValueError(f"unknown quantize mode {mode!r} (known: {QUANTIZE_MODES})")


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of the transformer blocks, by qualified name (``blocks.0.attn1.to_q``, ...)."""
    return {f"blocks.{name}": m for name, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear)}


def is_quantized(linear: torch.nn.Linear) -> bool:
    """Whether `linear`'s weight is a torchao quantized tensor."""
    return type(linear.weight) is not torch.Tensor and type(linear.weight) is not torch.nn.Parameter


def quantize_blocks(model, mode: str) -> str:
    """Quantize the GEMMs of `model`'s transformer blocks to `mode` in place; return the mode applied:
    `mode`, or ``"none"`` when the kernel cannot run on the model's device (logged as a warning)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r} (known: {QUANTIZE_MODES})")
    if mode == "none":
        return "none"
    weight = model.blocks[0].attn1.to_q.weight
    reason = gemm_blocker(mode, weight.device, weight.dtype)
    if reason is not None:
        logger.warning(
            "quantize %r requested, but %s: the DiT's GEMMs stay in %s", mode, reason,
            str(weight.dtype).removeprefix("torch."),
        )
        return "none"
    ao = _torchao_quantization()
    config = torchao_config(mode)
    linears = block_linears(model)
    for linear in linears.values():
        if is_quantized(linear):
            raise ValueError("the DiT's blocks are quantized already")
    ao.quantize_(model.blocks, config)
    kinds = {type(linear.weight) for linear in linears.values()}
    for kind in kinds:
        _CONFIG_BY_TENSOR_TYPE[kind] = config
        _install_requantizing_copy(kind)
    logger.info("quantized %d Linear layers of the DiT's blocks to %s (torchao)", len(linears), mode)
    return mode


def requantized(like: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (a float ``(out, in)`` tensor) quantized with the config that made `like`."""
    config = _CONFIG_BY_TENSOR_TYPE[type(like)]
    holder = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = torch.nn.Parameter(weight.to(like.device, like.dtype), requires_grad=False)
    _torchao_quantization().quantize_(holder, config)
    return holder.weight


def _install_requantizing_copy(kind: type) -> None:
    """Make ``q.copy_(w)`` with a float `w` re-quantize `w` into `q` (in place) for torchao tensors of
    type `kind`; a quantized `w` is copied as torchao copies it."""
    aten = torch.ops.aten
    table = kind._ATEN_OP_TABLE[kind]
    previous = table[aten.copy_.default]
    if getattr(previous, "_requantizes", False):
        return

    from torchao.utils import TorchAOBaseTensor

    def copy_(func, types, args, kwargs):
        dst, src = args[0], args[1]
        if type(dst) is kind and not isinstance(src, TorchAOBaseTensor):
            src = requantized(dst, src)
        return previous(func, types, (dst, src, *args[2:]), kwargs)

    copy_._requantizes = True
    table[aten.copy_.default] = copy_
