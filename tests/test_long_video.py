"""Long videos in one process: a request of more frames than a window is planned as a chain of v2v
extension windows, each conditioned on the last frames of the window before, and stitched into one video.

The tiny preset's weights are random, so its frames are not smooth and pixel continuity cannot be judged by
eye; what is checked is what makes a seam continuous with a trained model: each later window's first latent
frame is exactly the VAE encoding of the window before's last frames (noise multiplier 0), so its first
decoded frame is exactly their VAE round trip, and the next latent frames stay nearer that encoding the
smaller their multiplier.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pusa_model import media
from pusa_model.errors import InvalidRequest
from pusa_model.engine import encode_conditioning, encode_extension, stitch_windows
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request, window_frame_counts
from pusa_model.request_schema import DEFAULT_EXTENSION, OVERLAP_FRAMES

TINY = get_preset("tiny")


def long_plan(**fields):
    """A plan in windows of 17 frames (each later one adds 17 - 13 = 4) unless `fields` say otherwise."""
    fields = {"prompt": "a long walk", "seed": 21, "steps": 3, "window_frames": 17, **fields}
    return plan_request(parse_request(fields), TINY)


@pytest.mark.parametrize(("frames", "window", "counts"), [
    (17, 17, [17]), (25, 17, [17, 17, 17]), (29, 17, [17, 17, 17, 17]),
    (401, 81, [81, 81, 81, 81, 81, 61]), (149, 81, [81, 81]), (93, 81, [81, 25]),
])
def test_window_counts_add_up_to_the_requested_frames(frames, window, counts):
    assert window_frame_counts(frames, window) == counts
    assert counts[0] + sum(c - OVERLAP_FRAMES for c in counts[1:]) == frames


def test_a_long_plan_is_the_task_then_extensions_of_the_window_before():
    plan = long_plan(task="i2v", images=["first.png"], frames=25, extension_multipliers=[0, 0.1, 0.2, 0.3])
    first, *later = plan.windows

    assert plan.frames == 25 and plan.window_frames == 17 and len(later) == 2
    assert first.request.task == "i2v" and first.frames == 17 and first.seed == 21
    assert [c.latent_index for c in first.conditioning] == [0]
    for i, window in enumerate(later, 1):
        assert window.request.task == "v2v" and window.request.v2v_mode == "extension"
        assert window.seed == 21 + i and window.frames == 17 and window.video_frames_needed == OVERLAP_FRAMES
        assert [(c.latent_index, c.multiplier) for c in window.conditioning] == \
            [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3)]
    # a window's own request plans as that window alone (what the service's VAE replans from)
    again = plan_request(parse_request(later[0].request.model_dump()), TINY)
    assert (again.windows, again.conditioning, again.seed) == ((again,), later[0].conditioning, 22)
    described = plan.describe()
    assert [w["new_frames"] for w in described["windows"]] == [17, 4, 4] and described["frames"] == 25


def test_extension_windows_default_to_the_demos_multipliers():
    window = long_plan(frames=21).windows[1]
    assert tuple(c.multiplier for c in window.conditioning) == DEFAULT_EXTENSION[1]


@pytest.mark.parametrize(("fields", "field"), [
    ({"frames": 25, "window_frames": 19}, "window_frames"),
    ({"frames": 25, "window_frames": 13}, "window_frames"),
    ({"frames": 27}, "frames"),
    ({"frames": 25, "extension_multipliers": [0, 0.3]}, "extension_multipliers"),
    ({"frames": 25, "extension_multipliers": [0, 0.3, 0.4, 1.5]}, "extension_multipliers.3"),
    ({"frames": 1205}, "frames"),
])
def test_bad_long_requests_name_their_field(fields, field):
    with pytest.raises(InvalidRequest) as caught:
        long_plan(**fields)
    assert caught.value.field == field


def test_the_video_is_its_windows_stitched_and_each_seam_holds_its_conditioning(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline
    plan = long_plan(frames=25)
    prompt, negative = pipe.text.encode(plan.request.prompt, plan.request.negative_prompt)
    pieces, finals, cleans = [], [], []
    for i, window in enumerate(plan.windows):  # the chain by hand, keeping what the pipeline throws away
        clean = encode_conditioning(pipe.vae, window) if i == 0 else encode_extension(pipe.vae, window, pieces[-1])
        latents = pipe.denoise(window, clean, prompt, negative)
        cleans.append(clean)
        finals.append(latents)
        pieces.append(media.frames_to_uint8(pipe.vae.decode(latents)))

    result = pipe.generate(plan, tmp_path / "long.mp4")

    stitched = stitch_windows(pieces)
    assert stitched.shape[0] == 25 and np.array_equal(stitched[:17], pieces[0])
    assert np.array_equal(stitched[17:21], pieces[1][OVERLAP_FRAMES:])
    assert media.probe_video(result.video_path)["frames"] == 25
    media.write_mp4(stitched, tmp_path / "by_hand.mp4", plan.request.fps)
    assert result.video_path.read_bytes() == (tmp_path / "by_hand.mp4").read_bytes()

    for j in (1, 2):
        tail = media.frames_to_tensor(pieces[j - 1][-OVERLAP_FRAMES:])
        encoded = pipe.vae.encode(tail)
        assert torch.equal(cleans[j][:, :, :4], encoded[:, :, :4])  # conditioned on the window before's end
        assert torch.equal(finals[j][:, :, 0], encoded[:, :, 0])  # multiplier 0: the seam frame is kept exactly
        round_trip = media.frames_to_uint8(pipe.vae.decode(encoded))[0]
        assert np.array_equal(pieces[j][0], round_trip)  # so its first decoded frame is their VAE round trip
        drift = [float((finals[j][:, :, t] - encoded[:, :, t]).abs().mean()) for t in range(4)]
        free = float((finals[j][:, :, 4] - encoded[:, :, 3]).abs().mean())
        assert drift[0] == 0 and all(0 < d < free for d in drift[1:]), (drift, free)
