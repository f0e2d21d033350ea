"""Tests for pusa_model.media: real files are written to tmp_path and read back."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from pusa_model.errors import InvalidRequest
from pusa_model.media import (
    MediaLimits,
    Mp4Writer,
    frames_to_uint8,
    load_image,
    load_video,
    probe_video,
    write_mp4,
    write_thumbnail,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
NUM_FRAMES = 8
LEVELS = [20 + 25 * i for i in range(NUM_FRAMES)]  # grey level of frame i


def bands(width: int, height: int, vertical: bool) -> np.ndarray:
    """Red / green / blue thirds, side by side (vertical=True) or stacked; green is the centre third."""
    pixels = np.zeros((height, width, 3), np.uint8)
    size = width if vertical else height
    cuts = [0, size // 3, size - size // 3, size]
    for colour, start, stop in zip((RED, GREEN, BLUE), cuts, cuts[1:]):
        if vertical:
            pixels[:, start:stop] = colour
        else:
            pixels[start:stop] = colour
    return pixels


def pattern_frames() -> np.ndarray:
    """(8, 32, 96, 3): red left third, blue right third, centre third grey at LEVELS[i]."""
    frames = np.tile(bands(96, 32, vertical=True), (NUM_FRAMES, 1, 1, 1))
    for i, level in enumerate(LEVELS):
        frames[i, :, 32:64] = level
    return frames


def has_encoder(name: str) -> bool:
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True, check=True
    )
    return any(line.split()[1:2] == [name] for line in result.stdout.splitlines() if line.strip())


def write_gif(frames: np.ndarray, path: Path) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    # Uneven frame durations: frames must still come out one per GIF frame, in order.
    durations = [100, 40, 200, 100, 60, 100, 100, 300][: len(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def write_webm(frames: np.ndarray, path: Path) -> None:
    if not has_encoder("libvpx-vp9"):
        pytest.skip("the ffmpeg bundled with imageio-ffmpeg has no libvpx-vp9 encoder")
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=8,
        codec="libvpx-vp9",
        quality=None,
        output_params=["-crf", "10", "-b:v", "0", "-deadline", "realtime", "-cpu-used", "8"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()


WRITERS = {
    "mp4": lambda frames, path: write_mp4(frames, path, fps=8),
    "webm": write_webm,
    "gif": write_gif,
}


@pytest.fixture(params=sorted(WRITERS))
def video_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"clip.{request.param}"
    WRITERS[request.param](pattern_frames(), path)
    return path


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize(
    ("source_size", "vertical", "target"),
    [
        ((300, 100), True, (64, 64)),  # wide source: left/right thirds are cut off
        ((100, 300), False, (32, 32)),  # tall source: top/bottom thirds are cut off
        ((60, 20), True, (96, 96)),  # small source: scaled up 4.8x, then cropped
        ((96, 288), False, (48, 32)),  # tall source into a wide target: only the centre third is left
    ],
)
def test_load_image_scales_to_cover_and_crops_centre(
    tmp_path: Path, fmt: str, source_size: tuple[int, int], vertical: bool, target: tuple[int, int]
) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    Image.fromarray(bands(*source_size, vertical=vertical)).save(path, format=fmt, quality=95)
    width, height = target

    image = load_image(path, width, height)

    assert image.shape == (3, height, width)
    assert image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    # Only the green centre third survives. A squash would put red/blue in the interior, a letterbox
    # black bars; at the very edges resampling blends in some of the cropped-off colours (up to half
    # when upscaling), but green must still dominate.
    red, green, blue = image[:, height // 8 : height - height // 8, width // 8 : width - width // 8]
    assert green.min() > 0.75, "green should fill the crop"
    assert red.max() < -0.7 and blue.max() < -0.7, "red/blue thirds should have been cropped away"
    for edge in (image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]):
        red, green, blue = edge.mean(dim=1)
        assert green > red + 0.2 and green > blue + 0.2, edge.mean(dim=1)


def test_load_image_exact_values_and_rgb_conversion(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("LA", (40, 20), (128, 255)).save(path)  # greyscale + alpha must become RGB
    Image.new("RGBA", (40, 20), (255, 0, 128, 255)).save(tmp_path / "rgba.png")

    grey = load_image(path, 16, 16)
    rgba = load_image(tmp_path / "rgba.png", 16, 16)

    assert torch.allclose(grey, torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(rgba[0], torch.ones(16, 16))
    assert torch.allclose(rgba[1], -torch.ones(16, 16))
    assert torch.allclose(rgba[2], torch.full((16, 16), 128 / 127.5 - 1), atol=1e-6)


def test_load_image_honours_exif_orientation(tmp_path: Path) -> None:
    # Stored 64 wide x 32 high, red left half, blue right half; EXIF orientation 6 means
    # "rotate 90 degrees clockwise to display", so it shows 32 wide x 64 high, red on top.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32], stored[:, 32:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)

    image = load_image(path, 32, 64)

    assert image.shape == (3, 64, 32)
    top, bottom = image[:, :24].mean(dim=(1, 2)), image[:, 40:].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < -0.8, f"top should be red, got {top}"
    assert bottom[2] > 0.8 and bottom[0] < -0.8, f"bottom should be blue, got {bottom}"


def test_load_image_accepts_bytes(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(bands(300, 100, vertical=True)).save(path)

    from_bytes = load_image(path.read_bytes(), 64, 64)

    assert torch.equal(from_bytes, load_image(path, 64, 64))
    assert from_bytes.shape == (3, 64, 64)


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make_source", "reason"),
    [
        (lambda tmp: tmp / "missing.png", "cannot read image: file not found: "),
        (lambda tmp: b"this is not an image at all", "cannot read image: "),
        (lambda tmp: b"", "cannot read image: the upload is empty"),
        (lambda tmp: empty_file(tmp / "empty.png"), "cannot read image: file is empty: "),
        (lambda tmp: png_bytes()[:300], "cannot read image: "),  # truncated PNG
    ],
    ids=["missing", "garbage", "empty-bytes", "empty-file", "truncated"],
)
def test_load_image_bad_input_raises_invalid_request(tmp_path: Path, make_source, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_image(make_source(tmp_path), 64, 64, field="start_image")

    assert caught.value.field == "start_image"
    assert reason in caught.value.reason
    assert str(caught.value).startswith("start_image: cannot read image: ")


# ---------------------------------------------------------------- videos


def test_load_video_first_frames_in_order(video_file: Path) -> None:
    video = load_video(video_file, 16, 16, num_frames=6)

    assert video.shape == (3, 6, 16, 16)
    assert video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    pixels = frames_to_uint8(video).astype(float)  # (6, 16, 16, 3)
    # The crop keeps only the grey centre third: all channels equal the frame's grey level.
    per_frame = pixels.mean(axis=(1, 2))  # (6, 3)
    expected = np.array(LEVELS[:6], float)[:, None].repeat(3, axis=1)
    assert np.abs(per_frame - expected).max() < 4, per_frame


def test_load_video_reads_exactly_all_frames(video_file: Path) -> None:
    video = load_video(video_file, 32, 32, num_frames=NUM_FRAMES)

    levels = frames_to_uint8(video)[:, 8:24, 8:24].mean(axis=(1, 2, 3))
    assert np.abs(levels - np.array(LEVELS)).max() < 4, levels


def test_load_video_too_short(video_file: Path) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_video(video_file, 16, 16, num_frames=NUM_FRAMES + 5, field="cond_video")

    assert caught.value.field == "cond_video"
    assert caught.value.reason == f"video has {NUM_FRAMES} frames; this request needs at least {NUM_FRAMES + 5}"


def test_load_video_accepts_bytes(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_mp4(pattern_frames(), path, fps=8)

    from_bytes = load_video(path.read_bytes(), 16, 16, num_frames=4)

    assert torch.equal(from_bytes, load_video(path, 16, 16, num_frames=4))
    assert from_bytes.shape == (3, 4, 16, 16)


def truncated_mp4(tmp: Path) -> bytes:
    path = tmp / "full.mp4"
    write_mp4(pattern_frames(), path, fps=8)
    return path.read_bytes()[:600]


@pytest.mark.parametrize(
    ("make_source", "reason"),
    [
        (lambda tmp: tmp / "missing.mp4", "cannot read video: file not found: "),
        (lambda tmp: str(tmp / "missing.webm"), "cannot read video: file not found: "),
        (lambda tmp: b"\x00garbage, not a video" * 20, "cannot read video: "),
        (lambda tmp: b"", "cannot read video: the upload is empty"),
        (lambda tmp: empty_file(tmp / "empty.mp4"), "cannot read video: file is empty: "),
        (truncated_mp4, ""),  # either unreadable or too few frames; both are InvalidRequest
    ],
    ids=["missing-path", "missing-str", "garbage", "empty-bytes", "empty-file", "truncated"],
)
def test_load_video_bad_input_raises_invalid_request(tmp_path: Path, make_source, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_video(make_source(tmp_path), 16, 16, num_frames=NUM_FRAMES, field="cond_video")

    assert caught.value.field == "cond_video"
    assert reason in caught.value.reason
    assert len(caught.value.reason) < 200, "reason should be one short line, not ffmpeg's whole log"


# ---------------------------------------------------------------- writing


def test_frames_to_uint8_maps_range_and_layout() -> None:
    video = torch.zeros(3, 2, 1, 2)
    video[0] = -1.0
    video[1] = 1.0
    video[2, 0] = 0.0
    video[2, 1, 0, 0], video[2, 1, 0, 1] = 5.0, -5.0  # out of range: clamped

    frames = frames_to_uint8(video)

    assert frames.dtype == np.uint8
    assert frames.shape == (2, 1, 2, 3)
    assert (frames[..., 0] == 0).all() and (frames[..., 1] == 255).all()
    assert frames[0, 0, 0, 2] == 128  # 0.0 -> 127.5 rounds to 128
    assert frames[1, 0, 0, 2] == 255 and frames[1, 0, 1, 2] == 0


def test_write_mp4_probe_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = np.repeat(np.repeat(rng.integers(0, 256, (16, 6, 4, 3), np.uint8), 8, axis=1), 16, axis=2)  # 16x48x64
    path = tmp_path / "out.mp4"

    write_mp4(frames, path, fps=12)

    assert probe_video(path) == {"width": 64, "height": 48, "frames": 16, "fps": 12.0, "codec": "h264"}
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    assert meta["pix_fmt"].startswith("yuv420p")
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat"), "faststart: the moov atom must come before mdat"
    # Stored at its own size, not rescaled, and at good quality.
    decoded = frames_to_uint8(load_video(path, 64, 48, num_frames=16))
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((4, 40, 64, 3), np.uint8),  # height not a multiple of 16
        np.zeros((4, 48, 64, 3), np.float32),  # not uint8
        np.zeros((48, 64, 3), np.uint8),  # not a sequence of frames
        np.zeros((0, 48, 64, 3), np.uint8),  # no frames
    ],
    ids=["size", "dtype", "ndim", "empty"],
)
def test_write_mp4_rejects_bad_frames(tmp_path: Path, frames: np.ndarray) -> None:
    with pytest.raises(ValueError):
        write_mp4(frames, tmp_path / "bad.mp4", fps=16)
    assert not (tmp_path / "bad.mp4").exists()


def test_mp4_writer_in_chunks_writes_the_file_write_mp4_writes_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    frames = np.repeat(np.repeat(rng.integers(0, 256, (17, 6, 4, 3), np.uint8), 8, axis=1), 16, axis=2)
    write_mp4(frames, tmp_path / "whole.mp4", fps=16)
    with Mp4Writer(tmp_path / "chunks.mp4", 64, 48, fps=16) as writer:
        for start in (0, 1, 5, 9, 13):  # the VAE's chunks: 1 frame, then 4 per latent frame
            writer.write(frames[start:start + (1 if start == 0 else 4)])
    assert writer.frames == 17
    assert (tmp_path / "chunks.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()


def test_mp4_writer_refuses_bad_chunks_and_reports_a_failed_ffmpeg(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a multiple of 16"):
        Mp4Writer(tmp_path / "a.mp4", 64, 40, fps=8)
    with Mp4Writer(tmp_path / "b.mp4", 64, 48, fps=8) as writer:
        with pytest.raises(ValueError, match=r"expected uint8 frames \(t, 48, 64, 3\)"):
            writer.write(np.zeros((2, 48, 80, 3), np.uint8))
        writer.write(np.zeros((2, 48, 64, 3), np.uint8))
    assert probe_video(tmp_path / "b.mp4")["frames"] == 2
    with pytest.raises(ValueError, match="at least one frame"):
        with Mp4Writer(tmp_path / "c.mp4", 64, 48, fps=8):
            pass
    with pytest.raises(OSError, match="ffmpeg wrote no video"):  # ffmpeg cannot open the output
        with Mp4Writer(tmp_path / "missing" / "d.mp4", 64, 48, fps=8) as writer:
            writer.write(np.zeros((2, 48, 64, 3), np.uint8))


def test_write_thumbnail_is_middle_frame_webp(tmp_path: Path) -> None:
    frames = np.stack([np.full((32, 48, 3), level, np.uint8) for level in (0, 60, 120, 180, 240)])
    path = tmp_path / "thumb.webp"

    write_thumbnail(frames, path)

    with Image.open(path) as thumb:
        assert thumb.format == "WEBP"
        assert thumb.size == (48, 32)
        pixels = np.asarray(thumb.convert("RGB")).astype(float)
    assert abs(pixels.mean() - 120) < 3


def test_probe_video_reports_gif_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "clip.gif"
    write_gif(pattern_frames(), path)

    info = probe_video(path)

    assert (info["width"], info["height"], info["frames"], info["codec"]) == (96, 32, NUM_FRAMES, "gif")
    with pytest.raises(InvalidRequest, match="file not found"):
        probe_video(tmp_path / "nope.mp4")


def test_ffmpeg_is_started_without_a_python_preexec_fn():
    """A preexec_fn makes Python fork() a process full of threads (Ray, gRPC, torch), whose child can die
    before exec: ffmpeg then seems to close its input at once (a "Broken pipe" with no output)."""
    from imageio_ffmpeg._utils import _popen_kwargs

    assert _popen_kwargs(prevent_sigint=True)["preexec_fn"] is None


def test_a_long_video_is_refused_from_its_header_before_anything_is_decoded(tmp_path: Path, monkeypatch) -> None:
    """3000 frames (1000 fps for 3 s) against a limit of 500: refused from the container (its header's duration,
    its packets counted without decoding); neither a count by decoding the whole file nor the frame reader runs."""
    from pusa_model import media

    path = tmp_path / "long.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    "color=c=black:s=16x16:r=1000:d=3", "-c:v", "libx264", "-preset", "ultrafast", str(path)],
                   check=True, timeout=120)
    decoded = []
    monkeypatch.setattr(imageio_ffmpeg, "count_frames_and_secs", lambda *a, **k: pytest.fail("decoded the whole file"))
    monkeypatch.setattr(media, "_bounded", lambda *a, **k: decoded.append(a) or iter(()))
    for from_end in (False, True):
        with pytest.raises(InvalidRequest, match="has 3000 frames; the limit is 500"):
            load_video(path, 16, 16, 17, from_end=from_end, limits=MediaLimits(max_frames=500))
    with pytest.raises(InvalidRequest, match=r"lasts 3 s; the limit is 2 s"):
        load_video(path, 16, 16, 17, limits=MediaLimits(max_seconds=2))
    assert decoded == []
