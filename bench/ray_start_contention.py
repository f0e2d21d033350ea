"""How long `ray.init` takes on a node with a cold page cache, alone and while `pusa-serve --read-ahead` reads.

`pusa-serve --read-ahead` starts reading the model packages and the checkpoint into the page cache before it
calls `ray.init`. On the device's fourth run `ray.init` took 29.6 s while the read-ahead read 50.9 GB in
28.7 s beside it. This measures, each after dropping the page cache (root only), a fresh interpreter's
``import ray; ray.init()`` (then `ray stop`):

- ``alone``: nothing else reading;
- ``packages``: beside the read-ahead of the packages only (what the replicas import);
- ``checkpoint``: beside the read-ahead of the packages and the checkpoint folder (`pusa-serve`'s order).

    bash bench/device/run.sh ray_start_contention --model /tmp/pusa-random --out $OUT/ray_start.json

The checkpoint folder must exist (`service_gpu.py --phases checkpoint` writes one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from deployments.serve_command import READ_AHEAD_PACKAGES
from pusa_model.readahead import ReadAhead, checkpoint_order, package_folders
from service_gpu import settle_disk

RAY_INIT = "import time; t = time.perf_counter(); import ray; ray.init(); print(time.perf_counter() - t)"


def time_ray_init() -> float:
    """Seconds of ``import ray; ray.init()`` in a fresh interpreter (its Ray stopped after)."""
    out = subprocess.run([sys.executable, "-c", RAY_INIT], capture_output=True, text=True, check=True)
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint folder (pusa checkpoint)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    packages = package_folders(READ_AHEAD_PACKAGES)
    cases = {"alone": None, "packages": packages, "checkpoint": packages + checkpoint_order(args.model)}
    results: dict = {}
    for name, paths in cases.items():
        settled = settle_disk()
        reader = None if paths is None else ReadAhead(paths, threads=min(16, os.cpu_count() or 1))
        t0 = time.perf_counter()
        ray_init_s = time_ray_init()
        read = reader.wait() if reader else None
        results[name] = {**settled, "ray_init_s": ray_init_s,
                         "read_gb": read and round(read["bytes"] / 1e9, 1), "read_s": read and read["seconds"],
                         "wall_s": round(time.perf_counter() - t0, 2)}
        print(name, results[name], flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
