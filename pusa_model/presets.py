"""Model presets: the embedded `tiny` checkpoints and the real models, Pusa V1 and Pusa-Wan2.2.

A preset names where a checkpoint in diffusers layout lives (a local folder or an ``s3://`` prefix),
which LoRA file to apply, and the default output shape. The layout on disk is always::

    model_index.json
    transformer/   diffusers WanTransformer3DModel
    vae/           diffusers AutoencoderKLWan
    text_encoder/  transformers UMT5EncoderModel
    tokenizer/     its tokenizer
    <lora file>    Pusa LoRA (PEFT or ComfyUI keys), optional

A two-expert model (Wan2.2-T2V-A14B: diffusers' Wan2.2 layout) has a second transformer,
``transformer_2/`` (the low-noise expert; ``transformer/`` is the high-noise one) with its own Pusa LoRA
file, and a `boundary`: a step whose scheduler timestep t is at least ``boundary * 1000`` runs the
high-noise expert, any later step the low-noise one (`schedule.step_expert`).

`tiny` and `tiny-wan2.2` are built here, deterministically from a fixed seed, the first time they are
asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a tensor is made: a launcher reads presets without it
    import torch

TINY_SEED = 20250
# The models a request may name (its `model` field): each preset is of one of them (`Preset.model`).
MODEL_NAME = "pusa-v1"  # Pusa V1 (one transformer, Wan2.1); a request's model when it names none
WAN22_MODEL_NAME = "pusa-wan2.2"  # Pusa-Wan2.2 (two experts)
MODEL_NAMES = (MODEL_NAME, WAN22_MODEL_NAME)
LORA_FILENAME = "pusa_v1.safetensors"
WAN22_LORAS = ("high_noise_pusa.safetensors", "low_noise_pusa.safetensors")  # Pusa-Wan2.2's, one per expert
WAN22_BOUNDARY = 0.875  # Wan2.2-A14B's: the high-noise expert runs while t >= boundary * 1000

# Words the tiny tokenizer is trained on: Wan's negative prompt and common prompt vocabulary.
_TINY_CORPUS = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards. A cat walks on the grass, realistic. A car drives through a city at night. "
    "The camera pans slowly over mountains and a river at sunset, cinematic lighting, 4k."
)


@dataclass(frozen=True)
class Preset:
    """Where a model lives and how requests default on it."""

    name: str
    source: str  # local folder or s3://bucket/prefix
    model: str = MODEL_NAME  # the model a request names to run on this preset (one of `MODEL_NAMES`)
    lora: str | None = LORA_FILENAME  # path inside `source`, or None for no LoRA
    lora_alpha: float = 1.4  # the Pusa LoRA's alpha when a request leaves lora_alpha out
    # A two-expert model: the low-noise expert's Pusa LoRA and alpha, and the boundary (None: one expert).
    lora_2: str | None = None
    lora_alpha_2: float | None = None
    boundary: float | None = None
    width: int = 832
    height: int = 480
    frames: int = 81
    window_frames: int = 81  # the longest video made in one window; longer ones are chains of windows
    dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)

    @property
    def experts(self) -> int:
        """How many transformers the model has: 1, or 2 (high noise, low noise) with a `boundary`."""
        return 1 if self.boundary is None else 2

    @property
    def transformers(self) -> tuple[str, ...]:
        """The folders of the experts' transformers, in expert order."""
        return ("transformer", "transformer_2")[: self.experts]

    @property
    def loras(self) -> tuple[str | None, ...]:
        """Each expert's Pusa LoRA file."""
        return (self.lora, self.lora_2)[: self.experts]

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


def default_cache_dir() -> Path:
    """Node-local folder for built and downloaded checkpoints (``PUSA_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("PUSA_CACHE_DIR", Path.home() / ".cache" / "pusa"))


def get_preset(name: str) -> Preset:
    """Return the preset called `name`: ``tiny``, ``tiny-wan2.2``, ``pusa-v1`` or ``pusa-wan2.2``.

    ``pusa-v1`` reads its source from ``PUSA_MODEL_SOURCE`` (a folder or ``s3://`` prefix holding
    Wan2.1-T2V-14B in diffusers layout) and its LoRA path from ``PUSA_LORA`` (default
    ``pusa_v1.pt``, relative to the source). ``pusa-wan2.2`` reads its source from ``PUSA_WAN22_SOURCE``
    (Wan2.2-T2V-A14B in diffusers layout with the two Pusa LoRA files `WAN22_LORAS` beside it); its
    boundary is 0.875 and its default alphas 1.5 (high noise) and 1.4 (low noise), the authors' values.
    """
    if name == "tiny":
        return Preset(
            name="tiny",
            source=str(default_cache_dir() / TINY_BUILD),
            width=64,
            height=64,
            frames=17,
            dtype="float32",
        )
    if name == "tiny-wan2.2":
        return Preset(name="tiny-wan2.2", source=str(default_cache_dir() / TINY_WAN22_BUILD), width=64, height=64,
                      frames=17, dtype="float32", **_wan22_fields())
    if name == "pusa-wan2.2":
        source = os.environ.get("PUSA_WAN22_SOURCE")
        if not source:
            raise ConfigError("preset pusa-wan2.2 needs PUSA_WAN22_SOURCE (a folder or s3:// prefix)")
        return Preset(name="pusa-wan2.2", source=source, **_wan22_fields())
    if name == "pusa-v1":
        source = os.environ.get("PUSA_MODEL_SOURCE")
        if not source:
            raise ConfigError("preset pusa-v1 needs PUSA_MODEL_SOURCE (a folder or s3:// prefix)")
        return Preset(name="pusa-v1", source=source, lora=os.environ.get("PUSA_LORA", "pusa_v1.pt"))
    raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESET_NAMES)})")


def _wan22_fields() -> dict:
    """What the Wan2.2 presets share: the LoRA files, the authors' alphas and the boundary."""
    return dict(model=WAN22_MODEL_NAME, lora=WAN22_LORAS[0], lora_2=WAN22_LORAS[1], lora_alpha=1.5, lora_alpha_2=1.4,
                boundary=WAN22_BOUNDARY)


PRESET_NAMES = ("tiny", "tiny-wan2.2", "pusa-v1", "pusa-wan2.2")
TINY_PRESETS = {MODEL_NAME: "tiny", WAN22_MODEL_NAME: "tiny-wan2.2"}  # each model's embedded small preset
TINY_BUILD = "tiny-2"  # the cache folder of the tiny checkpoint; a new name when its configs change
TINY_WAN22_BUILD = "tiny-wan2.2-1"  # the tiny two-expert checkpoint's


def tiny_transformer_config() -> dict:
    """WanTransformer3DModel config of the tiny preset (Wan2.1 architecture, small sizes)."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=128,  # positions per axis: 2 × 8 × 128 = 2048 pixels, above MAX_SIDE
    )


def tiny_vae_config() -> dict:
    """AutoencoderKLWan config of the tiny preset (16 latent channels, /8 spatial, /4 temporal)."""
    return dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def tiny_text_encoder_config(vocab_size: int) -> dict:
    """UMT5 config of the tiny preset."""
    return dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on an embedded corpus, with T5's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_lora_state_dict(
    transformer: torch.nn.Module, rank: int = 4, device: str = "cpu", dtype: torch.dtype | None = None,
    seed: int = TINY_SEED + 1,
) -> dict[str, torch.Tensor]:
    """Random Pusa-style LoRA weights for `transformer`, in the released PEFT key form
    (``blocks.N.self_attn.q.lora_A.default.weight``), targeting q, k, v, o of both attentions and
    the two FFN linears of every block; drawn from `seed` on `device`, stored on the CPU in `dtype` (default
    float32)."""
    import torch

    dtype = dtype or torch.float32
    names = {"self_attn": "attn1", "cross_attn": "attn2"}
    proj = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    ffn = {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
    gen = torch.Generator(device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    for i, block in enumerate(transformer.blocks):
        targets = {f"{a}.{p}": f"{names[a]}.{q}" for a in names for p, q in proj.items()}
        targets.update(ffn)
        for wan_name, diffusers_name in targets.items():
            linear = block.get_submodule(diffusers_name)
            a = torch.randn(rank, linear.in_features, generator=gen, device=device) / linear.in_features**0.5
            b = torch.randn(linear.out_features, rank, generator=gen, device=device) * 0.1
            out[f"blocks.{i}.{wan_name}.lora_A.default.weight"] = a.to("cpu", dtype)
            out[f"blocks.{i}.{wan_name}.lora_B.default.weight"] = b.to("cpu", dtype)
    return out


def build_tiny_distill_lora_state_dict(
    transformer: torch.nn.Module, rank: int = 8, seed: int = TINY_SEED + 2, norms: bool = True,
    device: str = "cpu", dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """A random stand-in for a step-distillation LoRA (LightX2V's), in its ComfyUI key form: ``diffusion_model.``
    prefix, ``lora_down``/``lora_up`` with an ``alpha`` (rank / 2) for q, k, v, o of both attentions and
    the two FFN linears, ``diff_b`` for their biases and the output head's, and (with `norms`) ``diff`` for
    the cross-attention norm (Wan's ``norm3``), the q/k RMS norms and every block's ``modulation``; drawn
    on `device`, stored on the CPU in `dtype` (default float32)."""
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator(device).manual_seed(seed)
    wan = {"self_attn": "attn1", "cross_attn": "attn2"}
    proj = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    out: dict[str, torch.Tensor] = {}

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to("cpu", dtype)

    for i, block in enumerate(transformer.blocks):
        prefix = f"diffusion_model.blocks.{i}"
        targets = {f"{a}.{p}": block.get_submodule(f"{wan[a]}.{q}") for a in wan for p, q in proj.items()}
        targets.update({"ffn.0": block.ffn.net[0].proj, "ffn.2": block.ffn.net[2]})
        for name, linear in targets.items():
            out[f"{prefix}.{name}.lora_down.weight"] = randn(rank, linear.in_features, scale=linear.in_features**-0.5)
            out[f"{prefix}.{name}.lora_up.weight"] = randn(linear.out_features, rank, scale=0.1)
            out[f"{prefix}.{name}.alpha"] = torch.tensor(rank / 2, dtype=dtype)
            out[f"{prefix}.{name}.diff_b"] = randn(linear.out_features, scale=0.02)
        if norms:
            dim = block.norm2.weight.shape[0]
            out[f"{prefix}.norm3.diff"] = randn(dim, scale=0.02)  # Wan's norm3: diffusers' norm2
            out[f"{prefix}.norm3.diff_b"] = randn(dim, scale=0.02)
            for attn in wan:
                out[f"{prefix}.{attn}.norm_q.diff"] = randn(dim, scale=0.02)
                out[f"{prefix}.{attn}.norm_k.diff"] = randn(dim, scale=0.02)
            out[f"{prefix}.modulation.diff"] = randn(*block.scale_shift_table.shape, scale=0.02)
    out["diffusion_model.head.head.diff_b"] = randn(transformer.proj_out.out_features, scale=0.02)
    return out


def build_tiny_checkpoint(dest: Path) -> Path:
    """Write the tiny preset's checkpoint to `dest` in diffusers layout (deterministic)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(TINY_SEED)
    transformer = WanTransformer3DModel(**tiny_transformer_config())
    vae = AutoencoderKLWan(**tiny_vae_config())
    text_encoder = UMT5EncoderModel(UMT5Config(**tiny_text_encoder_config(len(tokenizer))))
    save_checkpoint(dest, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    files={LORA_FILENAME: build_tiny_lora_state_dict(transformer)})
    return Path(dest)


def build_tiny_wan22_checkpoint(dest: Path) -> Path:
    """Write the tiny two-expert preset's checkpoint to `dest` in diffusers' Wan2.2 layout (deterministic): the
    tiny preset's tokenizer, text encoder and VAE (the same weights), two different random transformers of
    the tiny config and a different random Pusa LoRA for each (`WAN22_LORAS`)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(TINY_SEED)
    high = WanTransformer3DModel(**tiny_transformer_config())
    vae = AutoencoderKLWan(**tiny_vae_config())
    text_encoder = UMT5EncoderModel(UMT5Config(**tiny_text_encoder_config(len(tokenizer))))
    torch.manual_seed(TINY_SEED + 10)
    low = WanTransformer3DModel(**tiny_transformer_config())
    loras = {WAN22_LORAS[0]: build_tiny_lora_state_dict(high, seed=TINY_SEED + 11),
             WAN22_LORAS[1]: build_tiny_lora_state_dict(low, seed=TINY_SEED + 12)}
    save_checkpoint(dest, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=high,
                    transformer_2=low, files=loras, boundary_ratio=WAN22_BOUNDARY)
    return Path(dest)


def save_checkpoint(dest: Path, *, tokenizer, text_encoder, vae, transformer,
                    files: dict[str, dict[str, torch.Tensor]], transformer_2=None,
                    boundary_ratio: float | None = None) -> None:
    """Write the four parts in diffusers layout under `dest` with ``model_index.json``, and each state dict of
    `files` (LoRAs) at its relative path: ``.safetensors`` or, for ``.pt``/``.pth``, ``torch.save``. With
    `transformer_2` (a two-expert model), also ``transformer_2/`` and the index's ``boundary_ratio``, as
    diffusers' Wan2.2 checkpoints have them."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest / "tokenizer")
    transformer.save_pretrained(dest / "transformer")
    if transformer_2 is not None:
        transformer_2.save_pretrained(dest / "transformer_2")
    vae.save_pretrained(dest / "vae")
    text_encoder.save_pretrained(dest / "text_encoder")
    write_files(dest, files)
    write_model_index(dest, None if transformer_2 is None else boundary_ratio)


def write_files(dest: Path, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Each state dict of `files` at its path under `dest`: ``.safetensors``, or ``torch.save`` for ``.pt``."""
    import torch
    from safetensors.torch import save_file

    for name, state in files.items():
        path = Path(dest) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)


def write_model_index(dest: Path, boundary_ratio: float | None = None) -> None:
    """diffusers' ``model_index.json`` of a Wan pipeline; with `boundary_ratio`, of a two-expert one (its
    ``transformer_2`` and boundary, as Wan2.2-A14B's)."""
    model_index = {
        "_class_name": "WanPipeline",
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
    }
    if boundary_ratio is not None:
        model_index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=boundary_ratio)
    (Path(dest) / "model_index.json").write_text(json.dumps(model_index, indent=2))
