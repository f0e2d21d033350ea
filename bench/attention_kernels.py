"""The attention kernels alone at Wan2.1-14B's shapes (40 heads × 128, not causal): PyTorch's cuDNN and flash
SDPA, FlashAttention-3 bf16 and FP8 (fa3-fwd, `pusa_model.attention`), for the DiT's self-attention (all
tokens) and cross-attention (the 512 text tokens as keys), at 480p (32,760 tokens) and 720p (75,600).

    PUSA_DEVICE_BUNDLE=.device-model bash bench/device/run.sh attention_kernels --out $OUT/attention.json

Per kernel: median of `--runs` calls after warm-up (CUDA events), and the output's difference from cuDNN's
(relative L2, largest absolute). FP8 is timed twice: ``fa3_fp8`` is the whole path compiled (K smoothing,
per-head quantization of q, k, v and the kernel, as the DiT's compiled block runs it), ``fa3_fp8_kernel``
the kernel alone on inputs quantized beforehand; ``fa3_fp8_nosmooth`` is the path without K smoothing.
Inputs are random normal, K with a mean offset of `--k-offset` per channel (real keys have one; random
ones do not, which hides what smoothing is for). The first check, before any timing: FA3's output against
SDPA's on a small input (exits non-zero if it is off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from pusa_model.attention import fa3_attention, fa3_forward, fa3_import_error, quantize_fp8, smooth_k  # noqa: E402

TOKENS = {"480p": 32760, "720p": 75600}
HEADS, HEAD_DIM, TEXT = 40, 128, 512


def timed(fn, runs: int, warmup: int) -> tuple[float, torch.Tensor]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def sdpa(q, k, v, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def diff(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = out.float() - ref.float()
    return {"rel_l2": (d.norm() / ref.float().norm()).item(), "max_abs": d.abs().max().item()}


def check(device) -> dict:
    """FA3 bf16 and FP8 against float32 SDPA on a small input."""
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 4, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = fa3_forward(q, k, v)[0]
    out8 = fa3_forward(q, k, v, fp8=True)[0]
    result = {"bf16": diff(out, ref), "fp8": diff(out8, ref), "dtype": str(out.dtype), "fp8_dtype": str(out8.dtype)}
    print("check vs float32 SDPA (1×1024×4×128):", result, flush=True)
    if result["bf16"]["rel_l2"] > 1e-2 or result["fp8"]["rel_l2"] > 0.15:
        raise SystemExit(f"FA3 output is off: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="480p")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k-offset", type=float, default=1.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    error = fa3_import_error()
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "fa3_import_error": error, "results": {}}
    print(report, flush=True)
    if error:
        raise SystemExit(error)
    report["check"] = check(device)
    fp8_path = torch.compile(lambda q, k, v: fa3_forward(q, k, v, fp8=True)[0], fullgraph=True)
    fp8_nosmooth = torch.compile(lambda q, k, v: fa3_forward(q, k, v, fp8=True, smooth=False)[0], fullgraph=True)
    scale = HEAD_DIM**-0.5
    for resolution in args.resolutions.split(","):
        tokens = TOKENS[resolution]
        for kind, keys in (("self", tokens), ("cross", TEXT)):
            gen = torch.Generator(device).manual_seed(1)
            shape = lambda n: (1, n, HEADS, HEAD_DIM)  # noqa: E731
            q = torch.randn(shape(tokens), generator=gen, device=device, dtype=torch.bfloat16)
            k = torch.randn(shape(keys), generator=gen, device=device, dtype=torch.bfloat16)
            k = (k + args.k_offset * torch.randn(1, 1, HEADS, HEAD_DIM, generator=gen, device=device)).bfloat16()
            v = torch.randn(shape(keys), generator=gen, device=device, dtype=torch.bfloat16)
            q8, k8, v8 = quantize_fp8(q), quantize_fp8(smooth_k(k)), quantize_fp8(v)
            kernels = {
                "cudnn": lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION),
                "flash_sdpa": lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION),
                "fa3": lambda: fa3_forward(q, k, v)[0],
                "fa3_fp8": lambda: fp8_path(q, k, v),
                "fa3_fp8_kernel": lambda: fa3_attention(q8[0], k8[0], v8[0], q8[1], k8[1], v8[1], scale)[0],
                "fa3_fp8_nosmooth": lambda: fp8_nosmooth(q, k, v),
            }
            rows, ref = {}, None
            for name, fn in kernels.items():
                try:
                    ms, out = timed(fn, args.runs, args.warmup)
                except Exception as err:  # noqa: BLE001 - keep the other kernels' numbers
                    rows[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
                    print(resolution, kind, name, rows[name], flush=True)
                    continue
                ref = out if ref is None else ref
                rows[name] = {"ms": ms, **diff(out, ref)}
                base = rows.get("cudnn", {}).get("ms")
                if base:
                    rows[name]["speedup_vs_cudnn"] = base / ms
                print(resolution, kind, name, rows[name], flush=True)
                del out
            report["results"][f"{resolution}_{kind}"] = rows
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["results"], indent=1))


if __name__ == "__main__":
    main()
