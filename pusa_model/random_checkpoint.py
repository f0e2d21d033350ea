"""Checkpoints of random weights in the layouts the ``pusa-v1`` and ``pusa-wan2.2`` presets load, at the real sizes
or the tiny ones.

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

For ``pusa-wan2.2`` (``PUSA_WAN22_SOURCE``) the folder is Wan2.2-T2V-A14B's: ``transformer/`` (the high-noise
expert) and ``transformer_2/`` (the low-noise one), each of Wan2.1-14B's architecture, ``model_index.json`` with
the boundary, each expert's Pusa LoRA (`WAN22_LORAS`, PEFT keys) and Wan2.2-Lightning's 4-step pair in
LightX2V's form (`LIGHTNING_FILES`). `share_from` (a ``pusa-v1`` folder written here) links the text encoder,
tokenizer and VAE, which Wan2.2-A14B shares with Wan2.1, and its transformer as both experts, writing only
the LoRAs: about 12 GB beside the 46 GB folder instead of 69 GB, where a disk holds both models. Both
experts then have the same base weights (their LoRAs differ): the same shapes, memory and speed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .presets import (
    MODEL_NAME,
    TINY_PRESETS,
    WAN22_BOUNDARY,
    WAN22_LORAS,
    WAN22_MODEL_NAME,
    build_tiny_distill_lora_state_dict,
    build_tiny_lora_state_dict,
    build_tiny_tokenizer,
    get_preset,
    save_checkpoint,
    tiny_text_encoder_config,
    tiny_transformer_config,
    tiny_vae_config,
    write_files,
    write_model_index,
)

SIZES = ("real", "tiny")
PUSA_LORA_FILE = "pusa_v1.pt"
DISTILL_LORA_FILE = "loras/distill_lightx2v.safetensors"
# Wan2.2-Lightning's T2V-A14B 4-step LoRA pair (high-noise, low-noise expert), for a `wan22_loras` entry
LIGHTNING_FILES = ("lightning/high_noise_model.safetensors", "lightning/low_noise_model.safetensors")
SHARED_PARTS = ("tokenizer", "text_encoder", "vae")  # what Wan2.2-A14B shares with Wan2.1-14B

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
    pusa_rank: int = 512, distill_rank: int = 64, seed: int = 0, model: str = MODEL_NAME,
    share_from: Path | None = None,
) -> dict:
    """Write a random-weights checkpoint of `model` and `size` (``real``: Wan2.1-T2V-14B's transformer, each
    Wan2.2-A14B expert being the same size, UMT5-XXL, the Wan VAE; ``tiny``: the tiny preset's configs) to
    `dest`, the models made on `device` (a GPU makes the 14B one in seconds). `layers` keeps only that many
    transformer blocks; `share_from` (``pusa-wan2.2`` only) links what the folder of a ``pusa-v1`` checkpoint
    has instead of writing it. Returns the seconds, bytes and parameters of each part."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if model not in (MODEL_NAME, WAN22_MODEL_NAME):
        raise ValueError(f"model must be {MODEL_NAME} or {WAN22_MODEL_NAME}, got {model!r}")
    real = size == "real"
    dtype = torch.bfloat16 if real else torch.float32
    experts = 2 if model == WAN22_MODEL_NAME else 1
    if share_from is not None:
        if experts == 1:
            raise ValueError(f"share_from is for {WAN22_MODEL_NAME} (a {MODEL_NAME} checkpoint shares nothing)")
        return _write_shared_wan22(Path(dest), Path(share_from), device, pusa_rank, distill_rank, seed, dtype)
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
    transformers, loras = [], {}
    for expert in range(experts):
        with torch.device(device):
            transformer = WanTransformer3DModel(**config)
        cast_like_checkpoint(transformer, dtype)
        loras.update(_lora_files(transformer, model, expert, pusa_rank, distill_rank, seed, device, dtype))
        transformers.append(transformer.to("cpu"))
        _empty_cache(device)
    seconds["transformer_loras"] = time.perf_counter() - started

    started = time.perf_counter()
    save_checkpoint(dest, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformers[0],
                    transformer_2=transformers[1] if experts > 1 else None, files=loras,
                    boundary_ratio=get_preset(TINY_PRESETS[model]).boundary)
    seconds["write"] = time.perf_counter() - started
    return {"seconds": {k: round(v, 2) for k, v in seconds.items()},
            "bytes": _sizes(Path(dest), get_preset(TINY_PRESETS[model]).transformers, loras),
            "parameters": {"transformer": sum(p.numel() for p in transformers[0].parameters()),
                           "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                           "vae": sum(p.numel() for p in vae.parameters())}}


def _lora_files(transformer: torch.nn.Module, model: str, expert: int, pusa_rank: int, distill_rank: int, seed: int,
                device: str, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """The random LoRA files of `model`'s `expert` for `transformer` (which may be on the meta device): the
    Pusa LoRA and the distill LoRA (Pusa V1's `PUSA_LORA_FILE` and `DISTILL_LORA_FILE`; Pusa-Wan2.2's
    `WAN22_LORAS` and `LIGHTNING_FILES`, each expert's its own draw)."""
    if model == MODEL_NAME:
        names, seeds = (PUSA_LORA_FILE, DISTILL_LORA_FILE), {}
    else:
        names, seeds = (WAN22_LORAS[expert], LIGHTNING_FILES[expert]), {"seed": seed + 11 + 10 * expert}
    pusa = build_tiny_lora_state_dict(transformer, rank=pusa_rank, device=device, dtype=dtype, **seeds)
    if seeds:
        seeds["seed"] += 1
    distill = build_tiny_distill_lora_state_dict(transformer, rank=distill_rank, device=device, dtype=dtype, **seeds)
    return dict(zip(names, (pusa, distill)))


def _write_shared_wan22(dest: Path, source: Path, device: str, pusa_rank: int, distill_rank: int, seed: int,
                        dtype: torch.dtype) -> dict:
    """A ``pusa-wan2.2`` folder at `dest` whose text encoder, tokenizer, VAE and both experts are links into the
    ``pusa-v1`` checkpoint at `source`; only the experts' LoRAs and the index are written."""
    from diffusers import WanTransformer3DModel

    if not (source / "model_index.json").is_file() or not (source / "transformer").is_dir():
        raise ValueError(f"share_from {source}: not a checkpoint folder (no model_index.json and transformer/)")
    started = time.perf_counter()
    with torch.device("meta"):  # the LoRAs need the Linears' shapes only
        transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(source / "transformer"))
    dest.mkdir(parents=True, exist_ok=True)
    for part in SHARED_PARTS:
        (dest / part).symlink_to((source / part).resolve(), target_is_directory=True)
    experts = get_preset(TINY_PRESETS[WAN22_MODEL_NAME]).transformers
    for folder in experts:  # both experts: the Pusa V1 checkpoint's transformer
        (dest / folder).symlink_to((source / "transformer").resolve(), target_is_directory=True)
    loras: dict[str, dict[str, torch.Tensor]] = {}
    for expert in range(len(experts)):
        loras.update(_lora_files(transformer, WAN22_MODEL_NAME, expert, pusa_rank, distill_rank, seed, device, dtype))
    write_files(dest, loras)
    write_model_index(dest, WAN22_BOUNDARY)
    return {"seconds": {"loras_write": round(time.perf_counter() - started, 2)},
            "bytes": _sizes(dest, experts, loras),
            "linked": {part: str((dest / part).resolve()) for part in (*SHARED_PARTS, *experts)}}


def _sizes(dest: Path, transformers: tuple[str, ...], loras: dict) -> dict[str, int]:
    """Bytes of each part of the checkpoint at `dest` (a linked part: its target's)."""
    parts = (*transformers, *SHARED_PARTS, *loras)
    return {part: _size(dest / part) for part in parts}


def _empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _size(path: Path) -> int:
    path = path.resolve()
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
