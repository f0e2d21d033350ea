"""Checkpoints of random weights in the layout the ``pusa-v1`` preset loads, at the real sizes or the tiny ones.

No model hub is reachable where the service is built and tested, yet its loaders, memory and start-up must be
shown at the real sizes. `write_random_checkpoint` writes what ``PUSA_MODEL_SOURCE`` names for ``pusa-v1``:

    model_index.json
    transformer/   WanTransformer3DModel (Wan2.1-T2V-14B: 40 blocks, 5120 wide), sharded safetensors, bf16
    text_encoder/  UMT5EncoderModel (UMT5-XXL encoder), bf16
    tokenizer/     a byte-level BPE tokenizer (the tiny preset's; its ids are valid UMT5 ids)
    vae/           AutoencoderKLWan (Wan2.1 VAE), float32
    pusa_v1.pt     the Pusa LoRA in its released form (PEFT keys, rank 512 by default)
    loras/distill_lightx2v.safetensors   a step-distillation LoRA in LightX2V's form (``lora_down``/``lora_up``,
                   ``alpha``, ``diff_b``, ``diff``), for the service's ``loras`` registry and mode fast

The weights are random, so the videos are noise; every loader, shape and byte count is the real one. The
published diffusers folder stores the transformer in float32; this one stores bf16, which the loader reads
the same way (``from_pretrained(torch_dtype=bfloat16)``) at half the disk.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .presets import (
    build_tiny_distill_lora_state_dict,
    build_tiny_lora_state_dict,
    build_tiny_tokenizer,
    save_checkpoint,
    tiny_text_encoder_config,
    tiny_transformer_config,
    tiny_vae_config,
)

SIZES = ("real", "tiny")
PUSA_LORA_FILE = "pusa_v1.pt"
DISTILL_LORA_FILE = "loras/distill_lightx2v.safetensors"

# UMT5-XXL's encoder (google/umt5-xxl, as Wan2.1 ships it): 5.7B parameters, 512 tokens of 4096.
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)


def cast_like_checkpoint(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast as ``from_pretrained(torch_dtype=dtype)`` does: parameters to `dtype` except the model's
    ``_keep_in_fp32_modules``, float buffers (RoPE tables) to float32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.data = buf.data.float()


def write_random_checkpoint(
    dest: Path, size: str = "real", device: str = "cpu", layers: int | None = None,
    pusa_rank: int = 512, distill_rank: int = 64, seed: int = 0,
) -> dict:
    """Write a random-weights checkpoint of `size` (``real``: Wan2.1-T2V-14B, UMT5-XXL, the Wan VAE; ``tiny``:
    the tiny preset's configs) to `dest`, the models made on `device` (a GPU makes the 14B one in seconds).
    `layers` keeps only that many transformer blocks. Returns the seconds and bytes of each part."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    real = size == "real"
    dtype = torch.bfloat16 if real else torch.float32
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):  # the text encoder first: its float32 build is freed before the transformer's
        text_encoder = UMT5EncoderModel(UMT5Config(**(UMT5_XXL if real else tiny_text_encoder_config(len(tokenizer)))))
        vae = AutoencoderKLWan(**({} if real else tiny_vae_config()))
    text_encoder = text_encoder.to(dtype).to("cpu")
    vae = vae.to("cpu")
    _empty_cache(device)
    seconds["text_encoder_vae"] = time.perf_counter() - started

    started = time.perf_counter()
    config = {} if real else tiny_transformer_config()
    if layers:
        config["num_layers"] = layers
    with torch.device(device):
        transformer = WanTransformer3DModel(**config)
    cast_like_checkpoint(transformer, dtype)
    loras = {
        PUSA_LORA_FILE: build_tiny_lora_state_dict(transformer, rank=pusa_rank, device=device, dtype=dtype),
        DISTILL_LORA_FILE: build_tiny_distill_lora_state_dict(transformer, rank=distill_rank, device=device, dtype=dtype),
    }
    transformer = transformer.to("cpu")
    _empty_cache(device)
    seconds["transformer_loras"] = time.perf_counter() - started

    started = time.perf_counter()
    save_checkpoint(dest, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    files=loras)
    seconds["write"] = time.perf_counter() - started
    parts = ("transformer", "text_encoder", "vae", "tokenizer", PUSA_LORA_FILE, DISTILL_LORA_FILE)
    return {"seconds": {k: round(v, 2) for k, v in seconds.items()},
            "bytes": {part: _size(Path(dest) / part) for part in parts},
            "parameters": {"transformer": sum(p.numel() for p in transformer.parameters()),
                           "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                           "vae": sum(p.numel() for p in vae.parameters())}}


def _empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
