"""Where one DiT forward's GPU time goes: the compiled per-frame forward at 480p under torch.profiler.

Wan2.1-T2V-14B with random bf16 weights (as bench/dit_forward.py builds it), latents 1×16×21×60×104,
text 1×512×4096, an i2v-like timestep vector, ``forward_per_frame`` with ``compile_block_forward()`` and
``select_attention_backend(model, "auto")``: the service's DiT forward. After ``--warmup`` forwards
(compile included) it times ``--runs`` forwards with CUDA events (no profiler), then profiles
``--runs`` more (CUDA activities) and groups every kernel into a category:

- attention: SDPA kernels (cuDNN ``sdpa``, flash, fmha),
- GEMM: cuBLAS / CUTLASS / nvjet / xmma / Triton template GEMMs,
- elementwise/norm (triton): inductor's fused Triton kernels (norms, modulation, residuals, RoPE),
- elementwise/norm (aten): PyTorch's own elementwise and reduction kernels,
- conv, memcpy/memset, other.

Per category: CUDA time per forward, share, kernel launches; achieved TFLOP/s for attention and GEMMs
from analytic FLOPs: self-attention ``4·B·heads·S²·head_dim`` per block (S = 21·30·52 = 32760 tokens),
cross-attention ``4·B·heads·S·512·head_dim``, every Linear ``2·tokens·in·out``. The top kernels by time
are listed. ``--quantize int8|fp8`` quantizes the blocks' GEMMs first and ``--attention sage`` picks
SageAttention (`pusa_model.quantize`), to see where the 8-bit paths' time goes. ``--tiny`` runs the same
code on the CPU (tiny model, float32) and groups CPU ops instead. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, schedule  # noqa: E402

from dit_forward import LATENTS, build_transformer, dit_inputs, environment, timed_call  # noqa: E402
from pusa_model.quantize import quantize_blocks  # noqa: E402
from pusa_model.transformer import (  # noqa: E402
    block_forward,
    compile_block_forward,
    forward_per_frame,
    select_attention_backend,
)

# (category, pattern), first match wins; names are matched case-insensitively.
CUDA_CATEGORIES = [
    ("memcpy/memset", r"^mem(cpy|set)"),
    ("GEMM", r"^triton_tem"),  # inductor GEMM templates (max-autotune)
    # inductor's fused pointwise/reduction kernels, whose names can mention the SDPA op they feed
    ("elementwise/norm (triton)", r"^triton_"),
    ("attention", r"fmha|flash|sdpa|attention|attn|\bmha|quant_per_block"),  # the last: SageAttention's Q/K quantization
    ("GEMM", r"gemm|cutlass|nvjet|xmma|cublas|matmul|wgmma|sm90_|sm80_|ampere_|hopper"),
    ("conv", r"conv|implicit|winograd"),
    ("elementwise/norm (aten)", r"elementwise|vectorized|reduce|norm|copy|cat|index|fill|unroll|where|softmax|rope"),
]
CPU_CATEGORIES = [
    ("attention", r"scaled_dot_product|attention|sdpa|flash"),
    ("GEMM", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)|mkl|gemm"),
    ("conv", r"conv"),
    ("elementwise/norm (compiled)", r"cpp_fused|triton_|compiled"),
]


def categorize(name: str, categories: list[tuple[str, str]]) -> str:
    for category, pattern in categories:
        if re.search(pattern, name, re.IGNORECASE):
            return category
    return "other"


def forward_flops(model, frames: int, rows: int, cols: int, text_len: int) -> dict[str, float]:
    """Analytic FLOPs of one forward: self- and cross-attention (QK^T and PV) and every Linear."""
    cfg = model.config
    s = frames * rows * cols
    d = cfg.num_attention_heads * cfg.attention_head_dim  # heads · head_dim
    layers = len(model.blocks)
    linear = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith("condition_embedder.text_embedder") or re.search(r"attn2\.to_(k|v|kv)$", name):
            tokens = text_len
        elif name.startswith("condition_embedder"):
            tokens = frames  # per-frame timestep embedding
        else:
            tokens = s
        linear += 2.0 * tokens * module.in_features * module.out_features
    return {
        "tokens": s,
        "self_attention": 4.0 * s * s * d * layers,
        "cross_attention": 4.0 * s * text_len * d * layers,
        "linear": linear,
    }


def kernel_table(prof, device: torch.device, runs: int) -> list[dict]:
    """Per kernel name (CUDA) or CPU op: total µs per forward and launches per forward."""
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    if device.type == "cuda":
        for event in prof.events():
            # kernels, memcpys and memsets; not the GPU-side copies of user annotations (ProfilerStep#N)
            if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False) \
                    and not event.name.startswith("ProfilerStep"):
                times[event.name] += event.time_range.elapsed_us()
                counts[event.name] += 1
        categories = CUDA_CATEGORIES
    else:  # CPU: self time of every op (these add up to the profiled CPU time)
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                times[avg.key] += avg.self_cpu_time_total
                counts[avg.key] += avg.count
        categories = CPU_CATEGORIES
    rows = [
        {"name": name, "category": categorize(name, categories), "us": us / runs, "launches": counts[name] / runs}
        for name, us in times.items()
    ]
    return sorted(rows, key=lambda r: -r["us"])


def summarize(kernels: list[dict], flops: dict[str, float], wall_s: float) -> dict:
    """Per-category time, share and launches per forward; TFLOP/s of attention and GEMMs."""
    total_us = sum(k["us"] for k in kernels)
    cats: dict[str, dict] = {}
    for k in kernels:
        c = cats.setdefault(k["category"], {"us": 0.0, "launches": 0.0, "kernels": 0})
        c["us"] += k["us"]
        c["launches"] += k["launches"]
        c["kernels"] += 1
    for name, c in cats.items():
        c["share"] = c["us"] / total_us if total_us else 0.0
        work = {"attention": flops["self_attention"] + flops["cross_attention"], "GEMM": flops["linear"]}.get(name)
        c["tflops"] = work / (c["us"] * 1e-6) / 1e12 if work and c["us"] else None
    return {
        "busy_s": total_us * 1e-6,
        "wall_s": wall_s,
        "idle_share": max(wall_s - total_us * 1e-6, 0.0) / wall_s if wall_s else None,
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]["us"])),
        "flops": flops,
        "total_tflops_per_wall": (flops["self_attention"] + flops["cross_attention"] + flops["linear"]) / wall_s / 1e12,
    }


def tables(summary: dict, kernels: list[dict], top: int, unit: str) -> str:
    f = summary["flops"]
    lines = [
        f"wall {summary['wall_s']:.3f} s per forward (CUDA events, no profiler); {unit} busy "
        f"{summary['busy_s']:.3f} s; idle {100 * (summary['idle_share'] or 0):.1f}%; "
        f"{summary['total_tflops_per_wall']:.1f} TFLOP/s overall",
        f"FLOPs per forward: self-attention {f['self_attention'] / 1e15:.3f} P, cross-attention "
        f"{f['cross_attention'] / 1e15:.4f} P, Linear {f['linear'] / 1e15:.3f} P (S = {f['tokens']})",
        "",
        "| category | s per forward | share | launches | kernels | TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in summary["categories"].items():
        tflops = f"{c['tflops']:.0f}" if c["tflops"] else "—"
        lines.append(f"| {name} | {c['us'] * 1e-6:.4f} | {100 * c['share']:.1f}% | {c['launches']:.0f} | "
                     f"{c['kernels']} | {tflops} |")
    lines += ["", f"Top {top} by time:", "", "| ms per forward | share | launches | category | kernel |",
              "|---|---|---|---|---|"]
    total = sum(k["us"] for k in kernels) or 1.0
    for k in kernels[:top]:
        name = k["name"] if len(k["name"]) <= 110 else k["name"][:107] + "..."
        lines.append(f"| {k['us'] / 1e3:.2f} | {100 * k['us'] / total:.1f}% | {k['launches']:.0f} | "
                     f"{k['category']} | `{name}` |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", default="480p", choices=sorted(LATENTS))
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards first (the compile is here)")
    parser.add_argument("--runs", type=int, default=2, help="timed forwards, then as many profiled ones")
    parser.add_argument("--attention", default="auto", help="select_attention_backend preference")
    parser.add_argument("--quantize", default="none", help="the blocks' GEMMs: none, int8, fp8")
    parser.add_argument("--eager", action="store_true", help="profile the eager per-frame forward instead")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny preset model, float32, on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the summary and kernel list as JSON here")
    parser.add_argument("--trace", type=Path, default=None, help="also export a Chrome trace here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 1:
        parser.error("--runs and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_transformer(args.tiny, None, device, dtype, args.seed)
    x, text, tau, (rows, cols), text_len = dit_inputs(model, args.resolution, args.tiny, args.seed, device, dtype)
    frames, height, width = x.shape[2:]
    backend = select_attention_backend(model, args.attention)
    gemms = quantize_blocks(model, args.quantize)
    block_fn = block_forward if args.eager else compile_block_forward()

    def forward() -> torch.Tensor:
        return forward_per_frame(model, x, tau, text, block_fn)

    report = {**environment(device), "attention": backend, "gemms": gemms, "compiled": not args.eager,
              "latents": [1, model.config.in_channels, frames, height, width], "text_len": text_len}
    print(f"{report['device']}, torch {report['torch']}, attention {backend}, GEMMs {gemms}, "
          f"{'eager' if args.eager else 'compiled'}", flush=True)
    with torch.no_grad():
        first, _ = timed_call(forward, device)
        for _ in range(args.warmup - 1):
            timed_call(forward, device)
        times = [timed_call(forward, device)[0] for _ in range(args.runs)]
        wall = statistics.median(times)
        report.update(first_s=first, times_s=times, median_s=wall)
        print(f"first forward {first:.2f} s; timed {', '.join(f'{t:.3f}' for t in times)} s", flush=True)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # one untimed profiled forward (profiler start-up), then `runs` recorded ones
        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=args.runs, repeat=1)) as prof:
            for _ in range(args.runs + 1):
                forward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                prof.step()
    if args.trace:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace))
    kernels = kernel_table(prof, device, args.runs)
    flops = forward_flops(model, frames, rows, cols, text_len)
    summary = summarize(kernels, flops, wall)
    report.update(summary=summary, kernels=kernels[:200])
    print("\n" + tables(summary, kernels, args.top, "GPU" if device.type == "cuda" else "CPU") + "\n", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
