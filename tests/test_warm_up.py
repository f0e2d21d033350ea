"""A compiled DiT replica compiles before it reports healthy, and a restarted one loads what it compiled.

`DiT.__init__` (the deployment's constructor, which Serve waits for before the replica is healthy) runs one
step at each `dit_warmup` shape; compiled, that step compiles the blocks, and the kernels go to
``PUSA_CACHE_DIR/compile`` (`pusa_model.transformer.use_compile_cache`). Each start runs in a fresh process,
as a replica does, with its own dynamo state; dynamo's and Inductor's counters tell what was compiled and
what came from the cache. Timings are reported, not asserted (docs/benchmarks.md has the H200's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deployments.app import AppArgs

START = """
import json, time
import numpy as np
from torch._dynamo.utils import counters
from deployments.dit import DiT
from pusa_model.operations import StepInput

replica = DiT.func_or_class(preset="tiny", options={"compile": True},
                            warmup=[{"width": 64, "height": 64, "frames": 17, "guidance": 5.0}])
ready = {"graphs": counters["stats"]["unique_graphs"], "inductor": dict(counters["inductor"]),
         "aot": dict(counters["aot_autograd"]), "ready_s": replica.ready_s,
         "start_s": replica.start_s}
text = np.zeros((1, 512, 32), dtype=np.float32)
clean = np.zeros((1, 16, 5, 8, 8), dtype=np.float32)  # a 64x64x17 request, two guidance passes
started = time.perf_counter()
replica.stage.run(StepInput(0, (1.0, 0.5, 0.0), (1.0,) * 5, 5.0, "standard", 1, clean.shape, None, clean, (text, text)))
ready.update(first_step_s=time.perf_counter() - started, graphs_after_step=counters["stats"]["unique_graphs"],
             inductor_after_step=dict(counters["inductor"]))
print(json.dumps(ready))
"""


def start_replica(cache: str) -> dict:
    env = {**os.environ, "PUSA_CACHE_DIR": cache}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_replica_compiles_before_it_is_ready_and_a_restart_loads_the_cache(tmp_path):
    cache = str(tmp_path / "cache")
    cold = start_replica(cache)
    assert cold["graphs"] == 1 and cold["inductor"].get("fxgraph_cache_miss") == 1  # compiled in the constructor
    assert cold["graphs_after_step"] == 1 and cold["inductor_after_step"] == cold["inductor"]  # not in the step
    assert os.listdir(os.path.join(cache, "compile", "inductor"))  # the node-local cache, beside the weights
    assert list(cold["start_s"]) == ["load", "warmup_0"]  # where the start went, in order
    assert sum(cold["start_s"].values()) <= cold["ready_s"] + 0.02
    assert cold["start_s"]["warmup_0"] > cold["start_s"]["load"]  # the tiny model compiles longer than it loads

    warm = start_replica(cache)  # a restarted replica on the same node
    assert warm["inductor"].get("fxgraph_cache_hit") == 1 and "fxgraph_cache_miss" not in warm["inductor"]
    assert warm["aot"].get("autograd_cache_hit") == 1
    assert warm["inductor_after_step"] == warm["inductor"]
    print(f"start to ready: cold {cold['ready_s']:.1f} s, warm {warm['ready_s']:.1f} s; "
          f"first step {cold['first_step_s']:.3f} / {warm['first_step_s']:.3f} s")


@pytest.mark.parametrize(("shape", "field"), [
    ({"width": 830, "height": 480, "frames": 81}, "width"),
    ({"width": 832, "height": 480, "frames": 80}, "frames"),
    ({"width": 832, "height": 480, "frames": 81, "steps": 4}, "steps"),
])
def test_a_bad_warm_up_shape_fails_the_deploy_naming_it(shape, field):
    with pytest.raises(ValueError) as caught:
        AppArgs.model_validate({"dit_warmup": [shape]})
    assert "dit_warmup.0" in str(caught.value) and field in str(caught.value)
