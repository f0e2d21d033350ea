"""Which attention kernel the DiT runs, per GPU, and FlashAttention-3 (bf16 and FP8) as a diffusers backend.

**Choosing** (`choose_attention`): a pure function of the preference, the GPU's compute capability (None
without CUDA), the kernels that import here, the weights' dtype and the head dim; it returns the kernel and,
when the preference could not be honoured, the reason. `pusa_model.transformer.select_attention_backend`
gathers those inputs from the model and applies the choice. Preferences:

- ``auto``: the fastest exact kernel of the GPU: FA3 bf16 on sm90 when `fa3-fwd` imports (else cuDNN SDPA),
  PyTorch's flash SDPA (FlashAttention-2 inside torch) on sm80/86/89, plain SDPA elsewhere (the CPU).
- ``auto_8bit``: the fastest 8-bit kernel of the GPU: FA3 FP8 on sm90, SageAttention (INT8 QKᵀ) on
  sm80/86/89 when installed (not on sm90, where it is slower than cuDNN's bf16 kernel); else as ``auto``.
- ``sdpa``: as ``auto`` among PyTorch's own kernels (cuDNN on sm90, flash on sm80+): no FA3.
- ``fa3``, ``fa3_fp8``: FlashAttention-3, bf16 or FP8 e4m3 (sm90 and bf16 weights; `fa3-fwd` installed).
- ``sage``: SageAttention (`pusa_model.quantize`); ``flash``: the flash-attn package, else torch's flash SDPA;
  ``xformers``; any other diffusers `AttentionBackendName` value is used as given.

An explicit choice that cannot run falls back to ``auto``'s choice, with a warning naming why (not
installed / failed to import, wrong compute capability, no CUDA, weights not bf16).

**FlashAttention-3** comes from the PyPI wheel ``fa3-fwd`` (0.0.3: FA3's forward built for sm90, bf16 and
FP8, module ``fa3_fwd_interface``), an optional dependency: nothing imports it until a GPU asks for it.
diffusers' own ``_flash_3`` backend wants ``flash_attn_interface`` (FA3 built from source) and its
``_flash_3_hub`` one downloads a kernel from the Hub; neither is usable here, so our function takes the
dispatcher's ``_flash_3`` slot (bf16), and FP8, which the dispatcher has no name for, gets
``_flash_3_fp8``, added to diffusers' `AttentionBackendName`. The kernel is wrapped in one opaque torch
custom op, ``pusa::fa3_attention``, with a fake (shape) implementation, so ``torch.compile(fullgraph=True)``
keeps it whole, and with a reference implementation for the CPU (the same math through SDPA), so the
compiled graph around it can be tested without the GPU.

**FP8** (`quantize_fp8`): q, k and v are quantized to e4m3 in the graph, before the op (so Inductor fuses
the scaling with RoPE and the norms), with one scale per (batch, head), the granularity FA3's descale
factors have; K is smoothed first (its mean over the tokens subtracted: each query's logits move by one
constant, which softmax ignores, while the values to quantize shrink). FA3 computes P·V in FP8 too and
returns bf16. In ``fa3_fp8`` mode the cross-attention (512 text tokens) stays on FA3 bf16: FP8 buys little
there and the text keys are what conditions the video.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName

from .quantize import SAGE_HEAD_DIMS, sage_import_error

logger = logging.getLogger(__name__)

FA3_MODULE = "fa3_fwd_interface"  # what the fa3-fwd wheel installs
FA3_HINT = "pip install 'fa3-fwd==0.0.3'"
FA3_CAPABILITY = (9, 0)  # the wheel's kernels are built for sm90 (Hopper) alone
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FA3_BACKEND = "_flash_3"  # the dispatcher's FA3 slot: bf16
FA3_FP8_BACKEND = "_flash_3_fp8"  # added to AttentionBackendName here

PREFERENCES = ("auto", "auto_8bit", "sdpa", "fa3", "fa3_fp8", "sage", "flash", "xformers")
# What `choose_attention` returns beside diffusers' names: set up by `enable_fa3` / `quantize.enable_sage`.
FA3, FA3_FP8, SAGE = "fa3", "fa3_fp8", "sage"


# ----------------------------------------------------------------------------------------------------
# Choosing


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel to run (a diffusers backend name, or ``fa3`` / ``fa3_fp8`` / ``sage``) and, when it is
    not what was asked for, why (None when the preference was honoured, or was ``auto``)."""

    kernel: str
    reason: str | None = None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sm(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def _missing(kernel: str, why_missing: Mapping[str, str] | None, default: str) -> str:
    return (why_missing or {}).get(kernel) or default


def kernel_blocker(
    kernel: str,
    capability: tuple[int, int] | None,
    available: Collection[str],
    dtype: torch.dtype,
    head_dim: int,
    why_missing: Mapping[str, str] | None = None,
) -> str | None:
    """Why `kernel` (``fa3``, ``fa3_fp8``, ``sage``) cannot run on a GPU of `capability` (None: no
    CUDA) for a DiT with `dtype` weights and `head_dim`, given the importable kernels `available`; or None."""
    if kernel in (FA3, FA3_FP8):
        name = "FlashAttention-3" + (" FP8" if kernel == FA3_FP8 else "")
        if capability is None:
            return f"{name} runs on CUDA GPUs only and the DiT is on the cpu, no CUDA device"
        if tuple(capability) != FA3_CAPABILITY:
            return f"{name} (fa3-fwd) is built for sm90 (Hopper) only, this GPU is {_sm(capability)}"
        if dtype != torch.bfloat16:
            return f"{name} (fa3-fwd) needs bf16 weights, the DiT is {_dtype_name(dtype)}"
        if head_dim > 256 or head_dim % 8:
            return f"FlashAttention-3 needs a head dim ≤ 256 and a multiple of 8, the DiT has {head_dim}"
        if FA3 not in available:
            return _missing(FA3, why_missing, f"the fa3-fwd package is not installed ({FA3_HINT})")
        return None
    if kernel == SAGE:
        if capability is None:
            return "SageAttention runs on CUDA GPUs only and the DiT is on the cpu, no CUDA device"
        if tuple(capability) < (8, 0):
            return f"SageAttention needs compute capability 8.0 or newer (Ampere), this GPU is {_sm(capability)}"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"SageAttention needs bf16 or fp16 weights, the DiT is {_dtype_name(dtype)}"
        if head_dim not in SAGE_HEAD_DIMS:
            return f"SageAttention supports head dims {SAGE_HEAD_DIMS}, the DiT has {head_dim}"
        if SAGE not in available:
            return _missing(SAGE, why_missing, "the sageattention package is not installed")
        return None
    raise ValueError(f"no blocker check for kernel {kernel!r}")


def choose_attention(
    preference: str,
    capability: tuple[int, int] | None,
    available: Collection[str],
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    why_missing: Mapping[str, str] | None = None,
) -> AttentionChoice:
    """The attention kernel for `preference` on a GPU of compute `capability` (None: no CUDA).

    `available`: the optional kernels that import here, among ``fa3`` (fa3-fwd), ``sage`` (sageattention),
    ``flash`` (the flash-attn package), ``xformers``; `why_missing` may say why one does not (shown in the
    reason). Pure: no device or import is looked at.
    """
    half = dtype in (torch.bfloat16, torch.float16)

    def auto() -> str:
        if capability is None:
            return "native"
        if half and kernel_blocker(FA3, capability, available, dtype, head_dim) is None:
            return FA3
        if tuple(capability) >= (9, 0) and half:
            return "_native_cudnn"  # 1.26× torch's flash kernel on an H100 (bench/README.md)
        if tuple(capability) >= (8, 0) and half:
            return "_native_flash"  # FlashAttention-2 inside torch
        return "native"

    if preference == "auto":
        return AttentionChoice(auto())
    if preference == "sdpa":  # auto among PyTorch's own kernels (FA3 left out): the baseline of benchmarks
        return AttentionChoice(choose_attention("auto", capability, set(), dtype, head_dim).kernel)
    if preference == "auto_8bit":
        reasons = []
        for kernel in (FA3_FP8, SAGE):
            reason = kernel_blocker(kernel, capability, available, dtype, head_dim, why_missing)
            if reason is None and kernel == SAGE and tuple(capability) >= (9, 0):
                # measured on an H200: SageAttention 1.0.6 (Triton) 0.86× cuDNN's bf16 kernel
                reason = "SageAttention 1.0.6 is slower than cuDNN's bf16 kernel on Hopper (docs/benchmarks.md)"
            if reason is None:
                return AttentionChoice(kernel)
            reasons.append(reason)
        return AttentionChoice(auto(), "no 8-bit attention kernel that pays runs here: " + "; ".join(reasons))
    if preference in (FA3, FA3_FP8, SAGE):
        reason = kernel_blocker(preference, capability, available, dtype, head_dim, why_missing)
        return AttentionChoice(preference) if reason is None else AttentionChoice(auto(), reason)
    if preference == "flash":
        if "flash" in available and capability is not None and tuple(capability) >= (8, 0):
            return AttentionChoice("flash")
        if capability is not None:
            return AttentionChoice("_native_flash", None if capability >= (8, 0) else
                                   f"flash attention needs sm80 or newer, this GPU is {_sm(capability)}")
        return AttentionChoice(auto(), "flash attention needs a CUDA GPU and the DiT is on the cpu, no CUDA device")
    if preference == "xformers":
        if "xformers" in available:
            return AttentionChoice("xformers")
        return AttentionChoice(auto(), _missing("xformers", why_missing, "the xformers package is not installed"))
    return AttentionChoice(preference)  # a diffusers backend name, used as given


def fa3_import_error() -> str | None:
    """Why fa3-fwd cannot be imported here, or None when it can (imports it)."""
    try:
        module = _import_fa3()
    except ImportError as error:
        if getattr(error, "name", None) in (FA3_MODULE, "fa3_fwd"):
            return f"the fa3-fwd package is not installed ({FA3_HINT})"
        return f"fa3-fwd failed to import ({type(error).__name__}: {error})"
    except (OSError, RuntimeError) as error:  # an ABI mismatch with this torch, a missing CUDA library
        return f"fa3-fwd failed to import ({type(error).__name__}: {error})"
    if not hasattr(module, "flash_attn_func"):
        return "the installed fa3_fwd_interface has no flash_attn_func"
    return None


def _import_fa3():
    """The installed ``fa3_fwd_interface`` module (raises ImportError; a seam for tests)."""
    return importlib.import_module(FA3_MODULE)


def available_kernels(capability: tuple[int, int] | None) -> tuple[frozenset[str], dict[str, str]]:
    """The optional kernels that import here, and why each other one does not. FA3 is imported only
    on an sm90 GPU (its wheel loads CUDA libraries); elsewhere it is unavailable by capability anyway."""
    available, why = set(), {}
    if capability is not None and tuple(capability) == FA3_CAPABILITY:
        error = fa3_import_error()
        if error is None:
            available.add(FA3)
        else:
            why[FA3] = error
    if capability is not None:
        error = sage_import_error()
        if error is None:
            available.add(SAGE)
        else:
            why[SAGE] = error
    if attention_dispatch._CAN_USE_FLASH_ATTN:
        available.add("flash")
    if attention_dispatch._CAN_USE_XFORMERS_ATTN:
        available.add("xformers")
    else:
        why["xformers"] = "the xformers package is not installed"
    return frozenset(available), why


# ----------------------------------------------------------------------------------------------------
# FP8 quantization of q, k, v (in the compiled graph)


def smooth_k(key: torch.Tensor) -> torch.Tensor:
    """`key` ``(B, S, H, D)`` less its mean over the tokens: each query's logits all move by the same
    amount (q·mean), so softmax, and the attention's output, do not change."""
    return key - key.mean(dim=1, keepdim=True)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` ``(B, S, H, D)`` as float8 e4m3 with one scale per (batch, head), and the descale factors
    ``(B, H)`` float32 that multiply it back: ``x ≈ x8.float() * descale[:, None, :, None]``.

    The scale maps the head's largest magnitude to 448 (e4m3's largest finite value); an all-zero head
    gets descale 1/448 (any value works there).
    """
    amax = x.abs().amax(dim=(1, 3)).float()  # (B, H)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale = FP8_MAX / amax
    x8 = (x.float() * scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, amax / FP8_MAX


def dequantize_fp8(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """float32 ``x8 * descale`` (the inverse of `quantize_fp8`, up to its rounding)."""
    return x8.float() * descale[:, None, :, None]


# ----------------------------------------------------------------------------------------------------
# The kernel as a custom op


@torch.library.custom_op("pusa::fa3_attention", mutates_args=())
def fa3_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_descale: Optional[torch.Tensor],  # noqa: UP045 - the typing form, for torch.library's schema inference
    k_descale: Optional[torch.Tensor],  # noqa: UP045
    v_descale: Optional[torch.Tensor],  # noqa: UP045
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
    """FlashAttention-3's forward on ``(B, S, H, D)`` tensors, not causal: bf16 in and out, or float8
    e4m3 in (with ``(B, H)`` float32 descale factors) and bf16 out. Returns the output ``(B, S, H, D)``
    and the log-sum-exp of each query's scaled logits ``(B, H, S)`` float32."""
    fa3 = _import_fa3()
    out, lse = fa3.flash_attn_func(
        query, key, value, softmax_scale=scale, causal=False,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, return_attn_probs=True,
    )
    return out, lse


@fa3_attention.register_fake
def _(query, key, value, q_descale, k_descale, v_descale, scale):
    out_dtype = torch.bfloat16 if query.dtype == torch.float8_e4m3fn else query.dtype
    batch, seq, heads, _ = query.shape
    out = query.new_empty((batch, seq, heads, value.shape[-1]), dtype=out_dtype)
    return out, query.new_empty((batch, heads, seq), dtype=torch.float32)


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_descale: torch.Tensor | None,
    k_descale: torch.Tensor | None,
    v_descale: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `fa3_attention` computes, in float32 through SDPA: the FP8 inputs are dequantized with their
    descale factors (FA3's own P·V rounding to FP8 is not modelled). The op's CPU implementation."""
    fp8 = query.dtype == torch.float8_e4m3fn
    q, k, v = (
        dequantize_fp8(t, d) if d is not None else t.float()
        for t, d in ((query, q_descale), (key, k_descale), (value, v_descale))
    )
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (B, H, S)
    out_dtype = torch.bfloat16 if fp8 else query.dtype
    return out.transpose(1, 2).to(out_dtype).contiguous(), lse


fa3_attention.register_kernel("cpu")(reference_attention)


def fa3_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    fp8: bool = False,
    smooth: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``(B, S, H, D)`` tensors through `fa3_attention`; with `fp8`, K smoothed (unless not
    `smooth`) and q, k, v quantized per (batch, head) first. Returns the output (the inputs' dtype) and
    the lse ``(B, H, S)``."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if not fp8:
        return fa3_attention(query, key, value, None, None, None, float(scale))
    mean = key.mean(dim=1, keepdim=True) if smooth else None
    if mean is not None:
        key = key - mean  # `smooth_k`
    (q8, qd), (k8, kd), (v8, vd) = quantize_fp8(query), quantize_fp8(key), quantize_fp8(value)
    out, lse = fa3_attention(q8, k8, v8, qd, kd, vd, float(scale))
    if mean is not None:  # the smoothed logits are short of q·mean each: the true lse (unused: dead code)
        lse = lse + (query.float() * mean.float()).sum(-1).transpose(1, 2) * scale
    return out.to(query.dtype), lse


# ----------------------------------------------------------------------------------------------------
# diffusers' dispatcher


def _checked(attn_mask, is_causal, return_lse, dropout_p=0.0, enable_gqa=False) -> None:
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise ValueError("the FlashAttention-3 backend supports no mask, causal attention, dropout or GQA")


def _backend_fn(fp8: bool):
    def attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        return_lse: bool = False,
        _parallel_config=None,
    ):
        _checked(attn_mask, is_causal, return_lse)
        if _parallel_config is None:
            out, lse = fa3_forward(query, key, value, scale, fp8)
            return (out, lse.transpose(1, 2)) if return_lse else out
        return attention_dispatch._templated_context_parallel_attention(
            query, key, value, None, 0.0, False, scale, False, return_lse,
            forward_op=forward_op, backward_op=_no_backward, _parallel_config=_parallel_config,
        )

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        _checked(attn_mask, is_causal, return_lse, dropout_p, enable_gqa)
        out, lse = fa3_forward(query, key, value, scale, fp8)
        return (out, lse.transpose(1, 2)) if return_lse else out  # lse as (B, S, H), as the templates want

    attention.__name__ = attention.__qualname__ = "_pusa_fa3_fp8_attention" if fp8 else "_pusa_fa3_attention"
    return attention


def _no_backward(*args, **kwargs):
    raise NotImplementedError("the FlashAttention-3 backend (fa3-fwd) is forward-only")


_FA3_FUNCTIONS = {False: _backend_fn(False), True: _backend_fn(True)}


def backend_name(value: str) -> AttentionBackendName:
    """diffusers' `AttentionBackendName` member of `value`, added to the enum when diffusers has none
    (the dispatcher looks its functions up by member; ``set_attention_backend`` lists ``__members__``)."""
    try:
        return AttentionBackendName(value)
    except ValueError:
        pass
    cls = AttentionBackendName
    member = str.__new__(cls, value)
    member._name_ = value.lstrip("_").upper()
    member._value_ = value
    member.__objclass__ = cls
    member._sort_order_ = len(cls._member_names_)
    if hasattr(cls, "_add_member_"):  # Python 3.13
        cls._add_member_(member._name_, member)
    else:
        cls._member_map_[member._name_] = member
        cls._member_names_.append(member._name_)
    cls._value2member_map_[value] = member
    return member


def register_fa3() -> tuple[AttentionBackendName, AttentionBackendName]:
    """Put our FA3 functions in the dispatcher: bf16 in the ``_flash_3`` slot, FP8 as ``_flash_3_fp8``;
    returns the two names. (Registering again is a no-op.)"""
    registry = attention_dispatch._AttentionBackendRegistry
    names = backend_name(FA3_BACKEND), backend_name(FA3_FP8_BACKEND)
    for fp8, name in zip((False, True), names):
        if registry._backends.get(name) is not _FA3_FUNCTIONS[fp8]:
            registry.register(
                name, constraints=[attention_dispatch._check_device, attention_dispatch._check_shape],
                supports_context_parallel=True,
            )(_FA3_FUNCTIONS[fp8])
    return names


def set_processor_backends(model, self_attention: str, cross_attention: str | None = None) -> None:
    """Point the self-attention (``attn1``) and cross-attention (``attn2``) processors of `model`'s
    blocks at dispatcher backends by name (without diffusers' requirement check, which would refuse the
    ``_flash_3`` slot: it wants FA3 built from source)."""
    self_name = backend_name(self_attention)
    cross_name = backend_name(cross_attention or self_attention)
    for block in model.blocks:
        block.attn1.processor._attention_backend = self_name
        block.attn2.processor._attention_backend = cross_name


def enable_fa3(model, fp8: bool = False, cross_attention: str = FA3_BACKEND) -> str:
    """Run `model`'s self-attention on FA3 (FP8 with `fp8`) and its cross-attention on `cross_attention`
    (default FA3 bf16); returns the self-attention's backend name. The caller checks that it can run
    (`choose_attention`)."""
    bf16_name, fp8_name = register_fa3()
    name = fp8_name if fp8 else bf16_name
    set_processor_backends(model, name.value, cross_attention)
    logger.info("FlashAttention-3 (fa3-fwd) %s: self-attention %r, cross-attention %r",
                "FP8" if fp8 else "bf16", name.value, cross_attention)
    return name.value
