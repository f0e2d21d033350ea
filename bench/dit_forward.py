"""One DiT forward of Wan2.1-T2V-14B (random bf16 weights): diffusers' stock per-token path against ours.

Variants, run in this order on ONE model (each leaves the model as it found it):

- ``stock``: ``model(x, timestep=<per-token (B, seq_len)>)``, eager: what VTA costs with stock diffusers
- ``ours``: `forward_per_frame` (modulation once per latent frame), eager
- ``ours_flash``: the same with SDPA forced to the flash kernel, to show what the kernel choice is worth
- ``ours_compiled``: ours with the per-frame block under ``torch.compile`` (one graph for all 40 blocks)
- ``stock_compiled``: stock per-token with diffusers' ``compile_repeated_blocks(fullgraph=True)``
- ``ours_compiled_fused``: ours compiled, with fused QKV / KV projections
- ``ours_compiled_sage``: ours compiled, attention through SageAttention (``attention: sage``)
- ``ours_compiled_fp8``: ours compiled, the blocks' GEMMs in FP8 with row-wise scales (``quantize: fp8``)
- ``ours_compiled_int8``: ours compiled, the blocks' GEMMs in INT8 (``quantize: int8``)
- ``ours_compiled_int8_sage``: both 8-bit paths Ampere has, together
- ``ours_compiled_fp8_fa3fp8``: FP8 GEMMs and FA3 FP8 self-attention: every 8-bit path Hopper has
- ``ours_compiled_fp8_fa3``: FP8 GEMMs and FA3 bf16 attention
- ``ours_compiled_fa3``: ours compiled, attention through FlashAttention-3 bf16 (``attention: fa3``, fa3-fwd)
- ``ours_compiled_fa3fp8``: ours compiled, self-attention through FA3 FP8 (``attention: fa3_fp8``)

Each is timed after warm-up (the first call, which compiles, is reported apart), with its peak memory
and its output's largest difference from ``stock`` on the same inputs, and, for the variants after
``ours_compiled``, the difference from that bf16 baseline's output. The quantized variants quantize the
one model in place and put its bf16 weights back afterwards (from a CPU copy). ``--tiny`` runs every
path on the CPU with the tiny preset's model in float32 (where SageAttention and FP8 fall back, as
logged). The baseline's attention is ``--attention`` (default ``sdpa``: PyTorch's best kernel, cuDNN on
Hopper; ``auto`` would pick FA3 there when fa3-fwd is installed). See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

from pusa_model.presets import tiny_transformer_config  # noqa: E402
from pusa_model.random_checkpoint import cast_like_checkpoint  # noqa: E402
from pusa_model.quantize import block_linears, quantize_blocks  # noqa: E402
from pusa_model.transformer import (  # noqa: E402
    BlockFn,
    block_forward,
    compile_block_forward,
    forward_per_frame,
    fuse_qkv,
    per_token_timesteps,
    select_attention_backend,
)

VARIANTS = (
    "stock", "ours", "ours_flash", "ours_compiled", "stock_compiled", "ours_compiled_fused",
    "ours_compiled_sage", "ours_compiled_fp8", "ours_compiled_int8", "ours_compiled_int8_sage",
    "ours_compiled_fp8_fa3fp8", "ours_compiled_fp8_fa3", "ours_compiled_fa3", "ours_compiled_fa3fp8",
)
BASELINE = "ours_compiled"  # the bf16 path the 8-bit variants are compared with
# Latent (frames, height, width) for 81 frames: 480×832 and 720×1280; the tiny ones keep the aspect.
LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
TINY_LATENTS = {"480p": (3, 12, 20), "720p": (3, 18, 32)}
TEXT_LEN = 512


@dataclass
class Timing:
    """Seconds per call after warm-up, the first call (compiles, if anything does), and memory."""

    median_s: float
    times_s: list[float]
    first_s: float
    peak_gib: float  # max allocated during the calls, weights included
    extra_gib: float  # peak above what was allocated before the first call

    @property
    def compile_s(self) -> float:
        return max(self.first_s - self.median_s, 0.0)


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds one call of `fn` takes (CUDA events on a GPU, perf_counter elsewhere), and its output."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(
    fn: Callable[[], torch.Tensor], device: torch.device, runs: int, warmup: int
) -> tuple[Timing, torch.Tensor]:
    """Run `fn` `warmup` times (at least once) and then `runs` timed times under no_grad; return the
    timing and the last output."""
    gib = 2**30
    base = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        first, out = timed_call(fn, device)
        for _ in range(warmup - 1):
            timed_call(fn, device)
        times = []
        for _ in range(runs):
            seconds, out = timed_call(fn, device)
            times.append(seconds)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    timing = Timing(statistics.median(times), times, first, peak / gib, max(peak - base, 0) / gib)
    return timing, out


def environment(device: torch.device) -> dict:
    """Device name and library versions."""
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for package in ("torchao", "sageattention", "triton", "fa3-fwd"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


class BlockWeights:
    """A CPU copy of the blocks' Linear weights, to put the bf16 model back after quantizing it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.saved: dict[str, torch.Tensor] | None = None

    def quantize(self, mode: str) -> str:
        if self.saved is None:
            self.saved = {name: lin.weight.detach().to("cpu") for name, lin in block_linears(self.model).items()}
        return quantize_blocks(self.model, mode)

    def restore(self) -> None:
        if self.saved is None:
            return
        device = self.model.patch_embedding.weight.device
        for name, linear in block_linears(self.model).items():
            linear.weight = torch.nn.Parameter(self.saved[name].to(device), requires_grad=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def forward_flops(config, frames: int, rows: int, cols: int, text_len: int) -> float:
    """Matmul FLOPs of one forward (projections, attention, FFN of every block)."""
    s, d, f, n = frames * rows * cols, config.num_attention_heads * config.attention_head_dim, config.ffn_dim, text_len
    per_block = 2 * s * d * d * 4 + 4 * s * s * d + 2 * s * d * d * 2 + 2 * n * d * d * 2 + 4 * s * n * d + 4 * s * d * f
    return float(per_block * config.num_layers)


def build_transformer(tiny: bool, layers: int | None, device: torch.device, dtype: torch.dtype, seed: int):
    """WanTransformer3DModel with random weights made on `device`: diffusers' default config is
    Wan2.1-T2V-14B (40 layers, 40 heads × 128, FFN 13824, text 4096); `--tiny` takes the tiny preset's."""
    config = tiny_transformer_config() if tiny else {}
    if layers:
        config["num_layers"] = layers
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in `dtype`: a float32 14B model would not fit beside a second expert
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default_dtype)
    cast_like_checkpoint(model, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def dit_inputs(model, resolution: str, tiny: bool, seed: int, device: torch.device, dtype: torch.dtype):
    """Random latents, text embeddings and an i2v-like timestep vector (frame 0 at m = 0.2, the rest at
    the step's t) for one forward at `resolution`; also the token grid ``rows, cols`` and text length."""
    frames, height, width = (TINY_LATENTS if tiny else LATENTS)[resolution]
    _, p_h, p_w = model.config.patch_size
    gen = torch.Generator(device).manual_seed(seed + 1)
    x = torch.randn(1, model.config.in_channels, frames, height, width, generator=gen, device=device, dtype=dtype)
    text_len = 16 if tiny else TEXT_LEN
    text = torch.randn(1, text_len, model.config.text_dim, generator=gen, device=device, dtype=dtype)
    tau = torch.full((1, frames), 875.0, device=device)
    tau[:, 0] = 0.2 * 875.0
    return x, text, tau, (height // p_h, width // p_w), text_len


def bench_resolution(
    model, resolution: str, args, device: torch.device, dtype: torch.dtype,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """All selected variants at one resolution; returns ``{variant: result}``. `progress` gets the
    results so far after each variant."""
    x, text, tau, (rows, cols), text_len = dit_inputs(model, resolution, args.tiny, args.seed, device, dtype)
    frames = x.shape[2]
    per_token = per_token_timesteps(tau, rows * cols)
    flops = forward_flops(model.config, frames, rows, cols, text_len)

    def stock() -> torch.Tensor:
        return model(x, timestep=per_token, encoder_hidden_states=text, return_dict=False)[0]

    def ours(block_fn: BlockFn = block_forward) -> Callable[[], torch.Tensor]:
        return lambda: forward_per_frame(model, x, tau, text, block_fn)

    backend = select_attention_backend(model, args.attention)
    compile_kwargs = {"backend": args.compile_backend}

    def compile_stock() -> None:
        model.compile_repeated_blocks(fullgraph=True, **compile_kwargs)

    def uncompile_stock() -> None:
        for block in model.blocks:  # undo the nn.Module.compile() that compile_repeated_blocks calls
            block._compiled_call_impl = None

    weights = BlockWeights(model)
    applied: dict[str, str] = {}  # variant -> the GEMM mode that quantize_blocks applied

    def quantized(name: str, mode: str, attention: str | None = None) -> Callable[[], None]:
        def set_up() -> None:
            if attention:
                select_attention_backend(model, attention)
            applied[name] = weights.quantize(mode)

        return set_up

    def restore(attention: bool = False) -> Callable[[], None]:
        def tear_down() -> None:
            weights.restore()
            if attention:
                select_attention_backend(model, backend)

        return tear_down

    # name: (call, set-up, tear-down); the tear-down restores the model for the next variant.
    plan: dict[str, tuple[Callable[[], torch.Tensor], Callable | None, Callable | None]] = {
        "stock": (stock, None, None),
        "ours": (ours(), None, None),
        "ours_flash": (
            ours(),
            lambda: select_attention_backend(model, "flash"),
            lambda: select_attention_backend(model, backend),
        ),
        "ours_compiled": (ours(compile_block_forward(**compile_kwargs)), None, None),
        "stock_compiled": (stock, compile_stock, uncompile_stock),
        # unfuse: to_q/k/v keep viewing the fused weights, so the values stay and nothing is copied
        "ours_compiled_fused": (
            ours(compile_block_forward(**compile_kwargs)),
            lambda: fuse_qkv(model),
            model.unfuse_qkv_projections,
        ),
        "ours_compiled_sage": (
            ours(compile_block_forward(**compile_kwargs)),
            lambda: select_attention_backend(model, "sage"),
            lambda: select_attention_backend(model, backend),
        ),
        "ours_compiled_fp8": (
            ours(compile_block_forward(**compile_kwargs)), quantized("ours_compiled_fp8", "fp8"), restore(),
        ),
        "ours_compiled_int8": (
            ours(compile_block_forward(**compile_kwargs)), quantized("ours_compiled_int8", "int8"), restore(),
        ),
        "ours_compiled_int8_sage": (
            ours(compile_block_forward(**compile_kwargs)),
            quantized("ours_compiled_int8_sage", "int8", "sage"),
            restore(attention=True),
        ),
        "ours_compiled_fa3": (
            ours(compile_block_forward(**compile_kwargs)),
            lambda: select_attention_backend(model, "fa3"),
            lambda: select_attention_backend(model, backend),
        ),
        "ours_compiled_fa3fp8": (
            ours(compile_block_forward(**compile_kwargs)),
            lambda: select_attention_backend(model, "fa3_fp8"),
            lambda: select_attention_backend(model, backend),
        ),
        "ours_compiled_fp8_fa3": (
            ours(compile_block_forward(**compile_kwargs)),
            quantized("ours_compiled_fp8_fa3", "fp8", "fa3"),
            restore(attention=True),
        ),
        "ours_compiled_fp8_fa3fp8": (
            ours(compile_block_forward(**compile_kwargs)),
            quantized("ours_compiled_fp8_fa3fp8", "fp8", "fa3_fp8"),
            restore(attention=True),
        ),
    }
    results: dict[str, dict] = {}
    reference = None
    baseline_out = None
    if "stock" not in args.variants:
        with torch.no_grad():
            reference = stock()  # untimed: the outputs are compared with it
    for name in VARIANTS:
        if name not in args.variants:
            continue
        fn, set_up, tear_down = plan[name]
        torch._dynamo.reset()
        try:
            if set_up:
                set_up()
            attention = _backend_name(model)
            print(f"[{resolution}] {name} ({attention}) ...", flush=True)
            timing, out = measure(fn, device, args.runs, args.warmup)
        except Exception as error:  # noqa: BLE001 - keep the other variants' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        finally:
            if tear_down:
                tear_down()
        reference = out if reference is None else reference
        diff = (out.float() - reference.float()).abs().max().item()
        scale = reference.float().abs().max().item()
        results[name] = {
            **asdict(timing),
            "compile_s": timing.compile_s,
            "attention": attention,
            "gemms": _gemms(applied.get(name, "none"), name, dtype),
            "tflops": flops / timing.median_s / 1e12,
            "max_abs_diff": diff,
            "max_rel_diff": diff / scale if scale else 0.0,
            **_differences(out, baseline_out),
        }
        if name == BASELINE:
            baseline_out = out
        del out
        if progress:
            progress(results)
    torch._dynamo.reset()
    for result in results.values():
        if "error" not in result:
            result["speedup_vs_stock"] = _ratio(results, "stock", result)
            result["speedup_vs_stock_compiled"] = _ratio(results, "stock_compiled", result)
            result["speedup_vs_baseline"] = _ratio(results, BASELINE, result)
    return results


def _gemms(applied: str, name: str, dtype: torch.dtype) -> str:
    """What the blocks' GEMMs ran in: the applied quantization, or the weights' dtype (and whether the
    variant asked for a quantization that fell back)."""
    if applied != "none":
        return applied
    plain = str(dtype).removeprefix("torch.")
    asked = next((mode for mode in ("fp8", "int8") if f"_{mode}" in name), None)
    return f"{plain} ({asked} fell back)" if asked else plain


def _differences(out: torch.Tensor, baseline: torch.Tensor | None) -> dict:
    """`out`'s difference from the bf16 baseline's output: largest absolute, and relative
    (largest over the baseline's largest magnitude; and in L2 norm)."""
    if baseline is None:
        return {}
    delta = out.float() - baseline.float()
    ref = baseline.float()
    return {
        "max_abs_vs_baseline": delta.abs().max().item(),
        "max_rel_vs_baseline": (delta.abs().max() / ref.abs().max()).item(),
        "rel_l2_vs_baseline": (delta.norm() / ref.norm()).item(),
    }


def _backend_name(model: WanTransformer3DModel) -> str:
    """The attention backend `model`'s processors use now (``self / cross`` when they differ)."""
    names = []
    for attn in (model.blocks[0].attn1, model.blocks[0].attn2):
        backend = attn.processor._attention_backend
        names.append(str(getattr(backend, "value", backend)))
    return names[0] if names[0] == names[1] else " / ".join(names)


def _ratio(results: dict, baseline: str, result: dict) -> float | None:
    """How many times faster `result` is than `baseline` (None if the baseline did not run)."""
    base = results.get(baseline, {})
    return base["median_s"] / result["median_s"] if "median_s" in base else None


def table(resolution: str, results: dict) -> str:
    """A markdown table of one resolution's results."""

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    def vs_baseline(r: dict) -> str:
        if "rel_l2_vs_baseline" not in r:
            return "—"
        return f"{r['max_abs_vs_baseline']:.3g} ({r['max_rel_vs_baseline']:.2g}; L2 {r['rel_l2_vs_baseline']:.2g})"

    lines = [
        f"### {resolution}",
        "",
        "| variant | attention | GEMMs | median s | TFLOP/s | vs stock | vs stock compiled | vs ours compiled | "
        "compile s (1st − median) | peak GiB | extra GiB | max abs Δ vs stock (rel) | Δ vs ours compiled (rel; L2) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} |" + " |" * 11)
            continue
        lines.append(
            f"| {name} | {r['attention']} | {r['gemms']} | {r['median_s']:.3f} | {r['tflops']:.1f} | "
            f"{ratio(r['speedup_vs_stock'])} | {ratio(r['speedup_vs_stock_compiled'])} | "
            f"{ratio(r['speedup_vs_baseline'])} | {r['compile_s']:.1f} | "
            f"{r['peak_gib']:.2f} | {r['extra_gib']:.2f} | {r['max_abs_diff']:.3g} ({r['max_rel_diff']:.2g}) | "
            f"{vs_baseline(r)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", default="480p", help="comma-separated: 480p, 720p (default 480p)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (compiling happens here)")
    parser.add_argument("--attention", default="sdpa",
                        help="select_attention_backend preference of the variants that name none (default sdpa: "
                             "PyTorch's best kernel, cuDNN on Hopper)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--layers", type=int, default=None, help="override the number of blocks (quick checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny preset model, float32, on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.resolutions = args.resolutions.split(",")
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS) | set(args.resolutions) - set(LATENTS)
    if unknown:
        parser.error(f"unknown variant(s) or resolution(s): {sorted(unknown)}")
    if args.runs < 1 or args.warmup < 1:
        parser.error("--runs and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    t0 = time.perf_counter()
    model = build_transformer(args.tiny, args.layers, device, dtype, args.seed)
    report = {
        **environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "config": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "build_s": time.perf_counter() - t0,
        "runs": args.runs,
        "warmup": args.warmup,
        "results": {},
    }
    print(f"{report['device']}, torch {report['torch']}, diffusers {report['diffusers']}; "
          f"model built in {report['build_s']:.1f} s", flush=True)
    def save() -> None:  # after each variant, so a later failure (or a time limit) keeps what was measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))

    for resolution in args.resolutions:

        def progress(results: dict, resolution: str = resolution) -> None:
            report["results"][resolution] = results
            save()

        report["results"][resolution] = bench_resolution(model, resolution, args, device, dtype, progress)
        print("\n" + table(resolution, report["results"][resolution]) + "\n", flush=True)
        save()


if __name__ == "__main__":
    main()
