"""Every invalid request is rejected with a message naming the field."""

from __future__ import annotations

import pytest

from pusa_model.errors import InvalidRequest
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request

TINY = get_preset("tiny")


def plan(**kw):
    kw.setdefault("prompt", "a cat")
    return plan_request(parse_request(kw), TINY)


@pytest.mark.parametrize(
    "kw,field,reason",
    [
        (dict(task="multi_frame", images=["a", "b"], positions=[0, 9], frames=17), "positions", "outside 0..4"),
        (dict(task="multi_frame", images=["a", "b"], positions=[-1, 2]), "positions", "outside"),
        (dict(task="multi_frame", images=["a", "b"], positions=[2, 2]), "positions", "more than once"),
        (dict(task="multi_frame", images=["a", "b"], positions=[1, 4], positions_unit="pixel"), "positions", "more than once"),
        (dict(task="multi_frame", images=["a", "b"], positions=[0, 17], positions_unit="pixel", frames=17), "positions", "pixel frame 17"),
        (dict(task="multi_frame", images=["a", "b"], positions=[0, 1, 2]), "positions", "3 positions for 2 images"),
        (dict(task="multi_frame", images=["a", "b"], multipliers=[0.2]), "multipliers", "1 multipliers for 2 positions"),
        (dict(task="multi_frame", images=["a", "b"], multipliers=[0.2, 1.5]), "multipliers", "outside [0, 1]"),
        (dict(task="multi_frame", images=["a", "b"], multipliers=[-0.1, 0.5]), "multipliers", "outside [0, 1]"),
        (dict(task="i2v", images=["a"], noise_multiplier=2.0), "noise_multiplier", "less than or equal to 1"),
        (dict(width=100), "width", "not a multiple of 16"),
        (dict(height=72), "height", "not a multiple of 16"),
        (dict(width=4000), "width", "less than or equal to 1920"),
        (dict(frames=80), "frames", "4k+1"),
        (dict(frames=0), "frames", "greater than or equal to 1"),
        (dict(steps=0), "steps", "greater than or equal to 1"),
        (dict(steps=51), "steps", "less than or equal to 50"),
        (dict(steps="many"), "steps", "integer"),
        (dict(guidance=0.5), "guidance", "greater than or equal to 1"),
        (dict(lora_alpha=5.5), "lora_alpha", "less than or equal to 5"),
        (dict(lora_alpha=0.05), "lora_alpha", "greater than or equal to 0.1"),
        (dict(mode="turbo"), "mode", "'standard' or 'fast'"),
        (dict(loras=[{"name": "a,b"}]), "loras.0.name", "should match pattern"),
        (dict(loras=[{"name": "a", "alpha": 6}]), "loras.0.alpha", "less than or equal to 5"),
        (dict(loras=[{"name": "a", "strength": 1}]), "loras.0.strength", "Extra inputs"),
        (dict(loras="not json"), "loras", "JSON"),
        (dict(prompt=""), "prompt", "at least 1 character"),
        (dict(task="i2v"), "images", "exactly one image"),
        (dict(task="i2v", images=["a", "b"]), "images", "exactly one image"),
        (dict(task="multi_frame", images=["a"]), "images", "two or more"),
        (dict(task="v2v"), "video", "needs an input video"),
        (dict(task="t2v", video="v.mp4"), "video", "takes no video"),
        (dict(task="t2v", images=["a"]), "images", "takes no images"),
        (dict(task="t2v", positions=[0]), "positions", "no conditioning"),
        (dict(task="v2v", video="v.mp4", positions=[]), "positions", "empty"),
        (dict(task="v2v", video="v.mp4", v2v_mode="extension", frames=9), "frames", "at least 4 latent frames"),
        (dict(task="warp"), "task", "'t2v'"),
        (dict(colour="red"), "colour", "Extra inputs"),
    ],
)
def test_invalid_requests_name_the_field(kw, field, reason):
    with pytest.raises(InvalidRequest) as info:
        plan(**kw)
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{field}: ")


def test_defaults_per_task():
    i2v = plan(task="i2v", images=["a"], frames=81)
    assert [(c.latent_index, c.multiplier) for c in i2v.conditioning] == [(0, 0.2)]
    keyframes = plan(task="multi_frame", images=["a", "b"], frames=81)
    assert [(c.latent_index, c.multiplier, c.image_index) for c in keyframes.conditioning] == [(0, 0.2, 0), (20, 0.5, 1)]
    three = plan(task="multi_frame", images=["a", "b", "c"], frames=17)
    assert [c.latent_index for c in three.conditioning] == [0, 2, 4]
    completion = plan(task="v2v", video="v.mp4", frames=81)
    assert [(c.latent_index, c.multiplier) for c in completion.conditioning] == [(0, 0.3), (20, 0.3)]
    assert completion.video_frames_needed == 81
    extension = plan(task="v2v", video="v.mp4", v2v_mode="extension", frames=81)
    assert [(c.latent_index, c.multiplier) for c in extension.conditioning] == [(0, 0.0), (1, 0.3), (2, 0.4), (3, 0.5)]
    assert extension.video_frames_needed == 13
    t2v = plan()
    assert (t2v.width, t2v.height, t2v.frames, t2v.request.steps, t2v.request.guidance) == (64, 64, 17, 10, 5.0)
    assert t2v.request.lora_alpha == 1.4 and t2v.request.fps == 25 and t2v.conditioning == ()


def test_pixel_positions_map_to_latent_frames():
    p = plan(task="multi_frame", images=["a", "b", "c"], positions=[0, 4, 80], positions_unit="pixel", frames=81)
    assert [c.latent_index for c in p.conditioning] == [0, 1, 20]


def test_noise_multiplier_fills_every_position():
    p = plan(task="v2v", video="v.mp4", positions=[0, 1, 2], noise_multiplier=0.1)
    assert [c.multiplier for c in p.conditioning] == [0.1, 0.1, 0.1]


def test_seed_given_or_drawn():
    assert plan(seed=42).seed == 42
    drawn = plan()
    assert isinstance(drawn.seed, int) and 0 <= drawn.seed < 2**31
