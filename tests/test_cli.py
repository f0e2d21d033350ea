"""`pusa generate` end to end: a playable MP4 of the right size and length for every task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pusa_cli import main
from pusa_model.media import probe_video, write_mp4

PUSA = [sys.executable, "-m", "pusa_cli"]


@pytest.fixture
def pusa(capsys):
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_folder) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {}
    for ext in ("png", "jpg", "webp"):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / f"in.{ext}")
        paths[ext] = folder / f"in.{ext}"
    write_mp4(rng.integers(0, 255, (21, 64, 80, 3), dtype=np.uint8), folder / "clip.mp4", fps=25)
    paths["mp4"] = folder / "clip.mp4"
    return paths


@pytest.mark.parametrize(
    "task_args,size,frames",
    [
        (["--task", "t2v"], (64, 48), 9),
        (["--task", "i2v", "--image", "{png}", "--noise-multiplier", "0.3"], (48, 64), 9),
        (["--task", "multi_frame", "--images", "{png},{jpg},{webp}", "--positions", "0,2,4"], (64, 64), 17),
        (["--task", "v2v", "--video", "{mp4}", "--positions", "0,4", "--multipliers", "0.3,0.3"], (64, 64), 17),
        (["--task", "v2v", "--v2v-mode", "extension", "--video", "{mp4}"], (64, 64), 17),
    ],
)
def test_generate_every_task(pusa, tmp_path, inputs, task_args, size, frames):
    args = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in task_args]
    out = tmp_path / "out.mp4"
    res = pusa(
        "generate", *args, "--prompt", "a cat walks on the grass", "--size", f"{size[0]}x{size[1]}",
        "--frames", str(frames), "--steps", "2", "--fps", "12", "--seed", "3", "-o", str(out), "--json",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["seed"] == 3 and set(summary["timings_s"]) >= {"text", "denoise", "decode"}
    info = probe_video(out)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (*size, frames, "h264")
    assert info["fps"] == pytest.approx(12)
    thumb = Image.open(out.with_suffix(".webp"))
    assert thumb.format == "WEBP" and thumb.size == size


def test_same_seed_same_video(pusa, tmp_path):
    outs = []
    for name in ("one.mp4", "two.mp4"):
        res = pusa("generate", "--prompt", "waves", "--steps", "2", "--frames", "5", "--seed", "9", "-o", str(tmp_path / name))
        assert res.returncode == 0, res.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]


def test_progress_bar_counts_steps(tmp_path):
    res = subprocess.run([*PUSA, "generate", "--prompt", "waves", "--steps", "3", "--frames", "5", "-o", str(tmp_path / "p.mp4")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "denoising" in res.stderr and "3/3" in res.stderr


def test_dry_run_prints_the_plan_without_a_model(tmp_path):
    env = dict(os.environ, PUSA_CACHE_DIR=str(tmp_path / "empty-cache"))
    res = subprocess.run(
        [*PUSA, "generate", "--task", "i2v", "--image", "x.png", "--prompt", "p", "--steps", "10", "--frames", "81",
         "--dry-run", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["latent_frames"] == 21 and len(plan["steps"]) == 10
    assert plan["steps"][0]["timesteps"][:2] == [200.0, 1000.0]
    assert not (tmp_path / "empty-cache").exists()  # no checkpoint was built or loaded


@pytest.mark.parametrize("args, experts, alphas", [
    ([], 1, (1.4, None)),
    (["--model", "pusa-wan2.2"], 2, (1.5, 1.4)),  # the model's tiny preset, with its per-expert defaults
    (["--model", "pusa-wan2.2", "--preset", "tiny-wan2.2", "--lora-alpha-2", "1.1"], 2, (1.5, 1.1)),
    (["--preset", "tiny-wan2.2"], 2, (1.5, 1.4)),
], ids=["default", "model", "model-and-preset", "preset"])
def test_generate_runs_the_model_of_its_model_or_preset(pusa, args, experts, alphas):
    res = pusa("generate", "--prompt", "p", "--steps", "4", "--dry-run", "--json", *args)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert ("boundary" in plan, plan["lora_alpha"], plan.get("lora_alpha_2")) == (experts == 2, *alphas)
    assert {step.get("expert", 0) for step in plan["steps"]} == set(range(experts))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frames", "80"], "pusa: error: frames: 80 is not of the form 4k+1 (e.g. 81)"),
        (["--size", "100x64"], "pusa: error: width: 100 is not a multiple of 16"),
        (["--steps", "60"], "pusa: error: steps: Input should be less than or equal to 50"),
        (["--task", "i2v", "--image", "/nonexistent/x.png"], "pusa: error: images[0]: file not found: /nonexistent/x.png"),
        (["--task", "multi_frame", "--images", "a.png,b.png", "--positions", "0,0"], "pusa: error: positions: latent frame 0 is given more than once"),
        (["--model", "pusa-wan2.2", "--preset", "tiny"], "pusa: error: model: --preset tiny is of model pusa-v1, not pusa-wan2.2"),
        (["--model", "pusa-v1", "--preset", "tiny-wan2.2", "--dry-run"],
         "pusa: error: model: --preset tiny-wan2.2 is of model pusa-wan2.2, not pusa-v1"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(pusa, args, message):
    res = pusa("generate", "--prompt", "p", *args)
    assert res.returncode == 2
    assert res.stderr.strip() == message


def test_short_video_is_rejected(pusa, tmp_path, inputs):
    res = pusa("generate", "--task", "v2v", "--video", str(inputs["mp4"]), "--prompt", "p", "--frames", "81",
               "--steps", "1", "-o", str(tmp_path / "x.mp4"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "pusa: error: video: video has 21 frames; this request needs at least 81"


def test_unreadable_image_is_rejected(pusa, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = pusa("generate", "--task", "i2v", "--image", str(bad), "--prompt", "p", "--steps", "1", "-o", str(tmp_path / "x.mp4"))
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("pusa: error: images[0]: cannot read image")


def test_every_request_field_has_the_same_flag_in_generate_and_client_submit():
    from pusa_client.cli import build_parser as client_parser
    from pusa_model.cli import build_parser as generate_parser
    from pusa_model.request_schema import GenerationRequest

    def flags(parser, command):
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        return {a.dest: (a.option_strings, a.choices, a.required) for a in sub._actions if a.option_strings}

    generate, submit = flags(generate_parser(), "generate"), flags(client_parser(), "submit")
    shared = {name for name in GenerationRequest.model_fields if name not in ("images", "loras")} | {"model"}
    assert shared <= set(generate) and shared <= set(submit)
    assert {name: generate[name] for name in shared} == {name: submit[name] for name in shared}
    for parser in (generate, submit):  # the list fields' friendlier forms
        assert {"image", "images", "lora", "size"} <= set(parser)
