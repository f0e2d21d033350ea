"""Per-frame timesteps for diffusers' WanTransformer3DModel.

VTA gives every latent frame its own timestep. diffusers accepts that as a per-token timestep of shape
``(B, seq_len)``, which builds the modulation tensors for every token. Tokens are frame-major and all
tokens of a frame share one timestep, so here the timestep embedding and the modulation are computed
once per frame, shape ``(B, F, ...)``, and broadcast over the frame's tokens. Every weight and
sub-module is diffusers' own; only the order of the arithmetic around them lives here, and it follows
``WanTransformerBlock.forward`` step for step.

Speed options (`DiTOptions`, applied by `apply_options`): the attention kernel of diffusers' dispatcher
(`select_attention_backend`; the choice per GPU, FlashAttention-3 and SageAttention in
`pusa_model.attention` and `pusa_model.quantize`), fused QKV projections (`fuse_qkv`), 8-bit GEMMs
(`pusa_model.quantize`) and a regional ``torch.compile`` of `block_forward` (`compile_block_forward`),
traced once and reused by every block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformerBlock

from .attention import FA3, FA3_FP8, SAGE, available_kernels, choose_attention, enable_fa3
from .presets import default_cache_dir
from .quantize import QUANTIZE_MODES, enable_sage, model_sage_blocker, quantize_blocks

logger = logging.getLogger(__name__)

BlockFn = Callable[
    [WanTransformerBlock, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], torch.Tensor
]


class TokenSplit(Protocol):
    """Sequence-parallel hook of `forward_per_frame` (`pusa_model.parallel.UlyssesTokens` implements it).

    `split` keeps this rank's share of a frame-major token sequence (dim 1) and `gather` undoes it. The
    share must hold the same number of tokens of every frame, so that the per-frame modulation still
    broadcasts over a ``(B, F, T_local, D)`` view.
    """

    def split(self, tokens: torch.Tensor, frames: int) -> torch.Tensor: ...

    def gather(self, tokens: torch.Tensor, frames: int) -> torch.Tensor: ...


def _per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, F*T, D) -> (B, F, T, D), a view."""
    return x.unflatten(1, (frames, -1))


def _modulate(norm_x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """norm_x (B, F*T, D) * (1 + scale) + shift with scale, shift of shape (B, F, D)."""
    frames = scale.shape[1]
    out = _per_frame(norm_x, frames) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
    return out.flatten(1, 2)


def _gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + update * gate in float32, gate of shape (B, F, D); returns x's dtype."""
    frames = gate.shape[1]
    out = _per_frame(x.float(), frames) + _per_frame(update.float(), frames) * gate.unsqueeze(2)
    return out.flatten(1, 2).type_as(x)


def block_forward(
    block: WanTransformerBlock,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    frame_modulation: torch.Tensor,
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One Wan block with a modulation per latent frame.

    `frame_modulation` is ``(B, F, 6, D)``: the block's six shift/scale/gate vectors for each frame.
    """
    mod = block.scale_shift_table.unsqueeze(0) + frame_modulation.float()  # (B, F, 6, D)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mod.unbind(2)

    # 1. Self-attention
    norm_x = _modulate(block.norm1(hidden_states.float()), scale_msa, shift_msa).type_as(hidden_states)
    attn_output = block.attn1(norm_x, None, None, rotary_emb)
    hidden_states = _gated_residual(hidden_states, attn_output, gate_msa)

    # 2. Cross-attention
    norm_x = block.norm2(hidden_states.float()).type_as(hidden_states)
    hidden_states = hidden_states + block.attn2(norm_x, encoder_hidden_states, None, None)

    # 3. Feed-forward
    norm_x = _modulate(block.norm3(hidden_states.float()), c_scale_msa, c_shift_msa).type_as(hidden_states)
    ff_output = block.ffn(norm_x)
    return _gated_residual(hidden_states, ff_output, c_gate_msa)


def forward_per_frame(
    model: WanTransformer3DModel,
    hidden_states: torch.Tensor,
    frame_timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    block_fn: BlockFn = block_forward,
    tokens: TokenSplit | None = None,
) -> torch.Tensor:
    """Velocity prediction of `model` with one timestep per latent frame.

    hidden_states: latents ``(B, C, F, H, W)``; frame_timesteps: ``(B, F)``;
    encoder_hidden_states: text embeddings ``(B, L, text_dim)``. Returns ``(B, C, F, H, W)``.
    Equal to ``model(hidden_states, timestep=<per-token (B, seq_len)>, ...)`` without building
    per-token tensors. `block_fn` runs each block: `block_forward` or `compile_block_forward()`'s result.
    `tokens` (sequence parallelism): the blocks and the output head run on `tokens.split`'s share of the
    sequence and RoPE, and `tokens.gather` reassembles the head's output before unpatchifying.
    """
    batch, _, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    frames, rows, cols = num_frames // p_t, height // p_h, width // p_w
    if frame_timesteps.shape != (batch, num_frames):
        raise ValueError(f"frame_timesteps must be {(batch, num_frames)}, got {tuple(frame_timesteps.shape)}")
    if p_t != 1:
        raise ValueError("per-frame timesteps need a temporal patch size of 1")

    rotary_emb = model.rope(hidden_states)
    x = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

    temb, timestep_proj, text, _ = model.condition_embedder(
        frame_timesteps.flatten(), encoder_hidden_states, None, timestep_seq_len=frames
    )
    frame_modulation = timestep_proj.unflatten(2, (6, -1))  # (B, F, 6, D)
    if tokens is not None:
        x = tokens.split(x, frames)
        rotary_emb = tuple(tokens.split(freqs, frames) for freqs in rotary_emb)

    for block in model.blocks:
        x = block_fn(block, x, text, frame_modulation, rotary_emb)

    shift, scale = (model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)  # (B, F, D) each
    x = _modulate(model.norm_out(x.float()), scale, shift).type_as(x)
    x = model.proj_out(x)
    if tokens is not None:
        x = tokens.gather(x, frames)

    x = x.reshape(batch, frames, rows, cols, p_t, p_h, p_w, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def per_token_timesteps(frame_timesteps: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """The same timesteps in diffusers' per-token form ``(B, F * tokens_per_frame)``."""
    return frame_timesteps.repeat_interleave(tokens_per_frame, dim=1)


def compile_block_forward(**compile_kwargs) -> BlockFn:
    """`block_forward` under ``torch.compile(fullgraph=True)`` (regional compilation).

    The block is an argument, so dynamo traces its parameters as graph inputs and one compiled graph
    serves every block of the same shapes: one compile per input shape, not one per block (a second
    shape, e.g. another resolution, gets dynamo's dynamic-shape recompile unless ``dynamic=False``).
    `compile_kwargs` go to ``torch.compile`` (e.g. ``backend``, ``mode``, ``dynamic``).
    """
    return torch.compile(block_forward, **{"fullgraph": True, **compile_kwargs})


def model_attention_inputs(model: WanTransformer3DModel) -> tuple[tuple[int, int] | None, torch.dtype, int]:
    """What `choose_attention` needs to know of `model`: its GPU's compute capability (None off CUDA), its
    blocks' weight dtype and the attention head dim."""
    weight = model.patch_embedding.weight
    capability = torch.cuda.get_device_capability(weight.device) if weight.device.type == "cuda" else None
    attn = model.blocks[0].attn1
    return capability, attn.to_q.weight.dtype, attn.inner_dim // attn.heads


def select_attention_backend(model: WanTransformer3DModel, preference: str = "auto") -> str:
    """Set the attention kernel of `model` (diffusers' attention dispatcher) and return its name.

    `pusa_model.attention.choose_attention` picks it from the preference, the GPU's compute capability
    and the kernels that import here (``auto``: FA3 bf16 on sm90 with fa3-fwd installed, else cuDNN SDPA
    there; torch's flash SDPA on sm80/86/89; ``native`` on the CPU. ``auto_8bit``: FA3 FP8 on sm90,
    SageAttention on sm80/86/89. ``fa3``, ``fa3_fp8``, ``sage``, ``flash``, ``xformers``; any other
    `AttentionBackendName` value is used as given and diffusers raises when its package is missing).
    A preference that cannot run falls back to ``auto``'s choice with a warning naming why.
    """
    capability, dtype, head_dim = model_attention_inputs(model)
    available, why_missing = available_kernels(capability)
    choice = choose_attention(preference, capability, available, dtype, head_dim, why_missing)
    name, reason = choice.kernel, choice.reason
    applied = False  # whether the processors are set already (our registrations bypass diffusers' setter)
    if name == SAGE:
        backend = enable_sage(model)
        if backend is None:  # pusa_model.quantize's own check disagreed: run auto's choice, say why
            reason = model_sage_blocker(model) or "SageAttention could not be enabled"
            name = choose_attention("auto", capability, available, dtype, head_dim).kernel
        else:
            name, applied = backend, True
    if name in (FA3, FA3_FP8):
        name, applied = enable_fa3(model, fp8=name == FA3_FP8), True
    if not applied:
        model.set_attention_backend(name)
    if reason is not None:
        logger.warning("attention backend %r requested, but %s: using %r", preference, reason, name)
    elif name != preference:
        logger.info("attention backend %r requested, using %r", preference, name)
    return name


def fuse_qkv(model: WanTransformer3DModel) -> None:
    """Fuse q/k/v (self-attention) and k/v (cross-attention) into one Linear each, without extra memory.

    diffusers' ``WanAttention.fuse_projections`` concatenates copies into ``to_qkv`` / ``to_kv``, which
    its ``WanAttnProcessor`` then uses. Here the original ``to_q`` / ``to_k`` / ``to_v`` parameters are
    re-pointed at slices of the fused ones, one attention at a time: no weight is stored twice, and
    whatever writes into them (the LoRA fuser) updates the fused projection too.
    """
    for attn in [m for m in model.modules() if isinstance(m, WanAttention)]:
        attn.fuse_projections()
        if attn.is_cross_attention:
            fused, parts = attn.to_kv, (attn.to_k, attn.to_v)
        else:
            fused, parts = attn.to_qkv, (attn.to_q, attn.to_k, attn.to_v)
        start = 0
        for linear in parts:
            stop = start + linear.out_features
            linear.weight.data = fused.weight.data[start:stop]
            linear.bias.data = fused.bias.data[start:stop]
            start = stop


@dataclass(frozen=True)
class DiTOptions:
    """Speed options of the per-frame DiT path (see `apply_options`).

    On an H100 (14B, bf16, 480p) compile takes a forward from 3.49 s to 2.85 s; the cuDNN kernel that
    "auto" picks there is 1.26× faster than flash; fused QKV gains under 0.5% (bench/README.md).
    ``attention: sage | fa3_fp8 | auto_8bit`` and ``quantize: int8 | fp8`` are the opt-in 8-bit paths
    (`pusa_model.quantize`, `pusa_model.attention`; docs/benchmarks.md has what they were measured to do,
    on random weights only).
    """

    compile: bool = False  # regional torch.compile of the per-frame block
    # `select_attention_backend` preference: "auto" (FA3 bf16 on sm90 with fa3-fwd, cuDNN SDPA there
    # without it, torch's flash SDPA on sm80/86/89), "auto_8bit" (FA3 FP8 on sm90, SageAttention on
    # sm80/86/89), "fa3", "fa3_fp8", "sage", "flash", "xformers" or a diffusers backend name
    attention: str = "auto"
    fast_attention: str | None = None  # the preference for requests in mode "fast" (None: `attention`)
    fuse_qkv: bool = False  # fused QKV / KV projections (`fuse_qkv`)
    quantize: str = "none"  # GEMMs of the blocks: "none" | "int8" | "fp8" (`pusa_model.quantize`)

    def attention_for(self, mode: str) -> str:
        """The attention preference of a request in `mode` ("standard" or "fast")."""
        return self.fast_attention if mode == "fast" and self.fast_attention else self.attention

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.quantize != "none" and self.fuse_qkv:
            # The fused weights are what would be quantized, while to_q/k/v (what a LoRA writes) view them.
            raise ValueError("fuse_qkv cannot be combined with quantize; choose one")


def apply_options(model: WanTransformer3DModel, options: DiTOptions) -> BlockFn:
    """Set `model`'s attention backend, fused projections and quantized GEMMs per `options` (in place)
    and return the block function to give `forward_per_frame`.

    Quantizing happens here, once. A LoRA fused later (or fused again at another alpha) is fused from
    the base weights and re-quantized as it is written: fuse first, then quantize (`pusa_model.quantize`).
    """
    backend = select_attention_backend(model, options.attention)
    if options.fuse_qkv:
        fuse_qkv(model)
    quantized = "none"
    if options.quantize != "none":
        quantized = quantize_blocks(model, options.quantize)
    logger.info(
        "DiT: attention %s, fused QKV %s, GEMMs %s, compiled %s",
        backend, options.fuse_qkv, quantized, options.compile,
    )
    if not options.compile:
        return block_forward
    use_compile_cache()
    return compile_block_forward()


def use_compile_cache() -> None:
    """Keep what torch.compile makes (Inductor's FX graph and AOTAutograd caches, Triton's kernels) in the
    node-local cache folder, ``PUSA_CACHE_DIR/compile``, beside the checkpoints: a restarted process
    loads its kernels instead of compiling them again. (Inductor reads the folder from the environment
    when it compiles; importing some libraries already fills in its default, so this sets it.)"""
    folder = default_cache_dir() / "compile"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
