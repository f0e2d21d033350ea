"""A DiT replica's start to ready: its weights made, the blocks compiled, one warm-up step at a request's
shape (what `DiT.__init__` does with ``dit_warmup`` before Serve routes to it), with an empty compile cache
(a node's first start) and with the cache that first start left (a restart on the same node).

Each start runs in a fresh Python process, as a replica does, with ``PUSA_CACHE_DIR`` on a temporary
folder (so ``PUSA_CACHE_DIR/compile`` starts empty); the weights are random, made on the device (the real
replica reads them from the node's copy of the checkpoint, which this does not time). Per start: the
seconds to build the model, to warm up, the sum (ready), then one more step at the shape (the first
request's step, which no longer compiles), and Inductor's cache hits and misses.

    python3 bench/replica_start.py --out replica_start.json          # Wan2.1-14B, 480x832x81, bf16
    python3 bench/replica_start.py --tiny                            # the tiny preset on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start(tiny: bool, width: int, height: int, frames: int, guidance: float) -> dict:
    """One replica start in this process (the child)."""
    started = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    from bench.dit_forward import build_transformer
    from pusa_model.dit import DiTStage
    from pusa_model.transformer import DiTOptions

    device = torch.device("cpu" if tiny else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    imported = time.perf_counter()
    model = build_transformer(tiny, None, device, torch.float32 if tiny else torch.bfloat16, seed=0)
    stage = DiTStage(model, None, DiTOptions(compile=True))
    sync()
    built = time.perf_counter()
    stage.warm_up(width, height, frames, guidance)
    sync()
    ready = time.perf_counter()
    stage.warm_up(width, height, frames, guidance)  # the first request's step: same shapes
    sync()
    return {"import_s": imported - started, "build_s": built - imported, "warmup_s": ready - built,
            "ready_s": ready - imported, "next_step_s": time.perf_counter() - ready,
            "inductor": dict(counters["inductor"]), "aot_autograd": dict(counters["aot_autograd"]),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def run_start(args: argparse.Namespace, cache: str) -> dict:
    command = [sys.executable, __file__, "--child", "--shape", args.shape, "--guidance", str(args.guidance)]
    if args.tiny:
        command.append("--tiny")
    env = {**os.environ, "PUSA_CACHE_DIR": cache}
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(name, None)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"a start failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset's DiT on the CPU, float32")
    parser.add_argument("--shape", default=None, help="WIDTHxHEIGHTxFRAMES (default 832x480x81; tiny 64x64x17)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.shape = args.shape or ("64x64x17" if args.tiny else "832x480x81")
    width, height, frames = (int(v) for v in args.shape.split("x"))
    if args.child:
        print(json.dumps(start(args.tiny, width, height, frames, args.guidance)))
        return
    with tempfile.TemporaryDirectory(prefix="pusa-replica-start-") as cache:
        cold = run_start(args, cache)
        warm = run_start(args, cache)
    result = {"shape": args.shape, "guidance": args.guidance, "cold": cold, "warm": warm,
              "ready_warm_over_cold": warm["ready_s"] / cold["ready_s"]}
    print(f"{cold['device']}, {args.shape}, guidance {args.guidance:g}: start to ready (build + warm-up)")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"  {name}: {r['ready_s']:.1f} s = {r['build_s']:.1f} + {r['warmup_s']:.1f}; next step "
              f"{r['next_step_s']:.2f} s; inductor {r['inductor']}")
    print(f"  warm / cold: {result['ready_warm_over_cold']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
