"""`bench/quality.py` runs as an operator would run it on a real checkpoint, here on the tiny preset: each
fast path's videos against the standard path's. INT8 GEMMs (torchao's, which run on the CPU) move the
decoded frames a little; the fast mode (4 steps at guidance 1 instead of 10 at 5) moves them much more; a
bf16 decode moves the frames a little and the latents not at all.
Random weights cannot say whether either looks worse; the test checks the comparison itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


def test_quality_compares_each_path_with_the_standard_one(tmp_path, tiny_folder):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a cat walks on the grass", "seed": 1, "steps": 4},
        {"task": "t2v", "prompt": "waves at sunset", "seed": 2, "steps": 4, "frames": 9},
    ]))
    out = tmp_path / "quality.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--requests", str(requests),
                           "--paths", "int8,fast,bf16vae", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["path"], r["request"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(p, i) for p in ("int8", "fast", "bf16vae") for i in (0, 1)}  # standard: the reference
    for i in (0, 1):
        int8, fast = rows["int8", i], rows["fast", i]
        assert all(math.isfinite(r[k]) for r in (int8, fast) for k in ("psnr_db", "ssim", "latent_rel_diff"))
        assert 0 < int8["latent_rel_diff"] < 0.05 and int8["ssim"] > 0.99  # quantized GEMMs: close, not equal
        assert fast["psnr_db"] < int8["psnr_db"] - 10 and fast["latent_rel_diff"] > 5 * int8["latent_rel_diff"]
        bf16vae = rows["bf16vae", i]
        assert bf16vae["latent_rel_diff"] == 0 and 25 < bf16vae["psnr_db"] < math.inf
    assert "| int8 | 0 |" in done.stdout  # the table an operator reads


def test_an_unknown_path_is_one_line_naming_it(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--paths", "int4"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "--paths: unknown path 'int4'" in done.stderr
