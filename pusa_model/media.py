"""Reading conditioning media (images, videos) and writing generated videos.

Images are read with Pillow (PNG, JPEG, WebP, anything Pillow opens; EXIF orientation is honoured),
videos with the ffmpeg bundled in imageio-ffmpeg (MP4, WebM, GIF, any container ffmpeg reads).

Resize rule, the same for images and every video frame: scale the source uniformly by the smallest
factor that makes it cover the target (both sides >= target), with Lanczos resampling, then crop the
centre to exactly ``width x height``. Nothing is stretched or letterboxed; what overhangs is cut off
equally on both sides.

Pixel tensors are float32 in [-1, 1], channels first: an image is (3, H, W), a video (3, T, H, W).
Unreadable input raises :class:`~pusa_model.errors.InvalidRequest` naming the request field.
"""

from __future__ import annotations

import collections
import io
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequest

Source = str | Path | bytes

# imageio-ffmpeg starts ffmpeg with `preexec_fn=os.setpgrp` unless told not to, which makes Python fork()
# the whole process instead of vfork()ing: in a process with many threads (Ray's, gRPC's, torch's) the child
# can hang or die before it runs ffmpeg (imageio-ffmpeg issue #58), seen as a "Broken pipe" with no ffmpeg
# output. Its own switch turns that off; ffmpeg then shares this process's group (and its Ctrl-C).
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

# ffmpeg log lines that say what went wrong, e.g. "[in#0 @ 0x55d0] moov atom not found".
_FFMPEG_PROBLEM = re.compile(r"not found|invalid|error|partial|corrupt|unsupported|no such|matches no", re.I)


class MediaLimits(BaseModel):
    """What decoding one input may cost: pixels per image or frame (decompression bombs), a video's
    frames and duration (checked from its header, then while decoding) and the wall time to decode it."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(default=4096 * 4096, ge=1)
    max_frames: int = Field(default=2000, ge=1)
    max_seconds: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    timeout_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)


DEFAULT_LIMITS = MediaLimits()


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale `image` to cover width x height and crop the centre (the module's resize rule)."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def frames_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 channels-first in [-1, 1]: (3, H, W) or (3, T, H, W)."""
    tensor = torch.tensor(pixels, dtype=torch.float32).div_(127.5).sub_(1.0)
    return tensor.movedim(-1, 0).contiguous()


def _check_source(source: Source, field: str, kind: str) -> None:
    """Reject missing files and empty input before handing them to a decoder."""
    if isinstance(source, bytes):
        if not source:
            raise InvalidRequest(field, f"cannot read {kind}: the upload is empty")
        return
    path = Path(source)
    if not path.is_file():
        raise InvalidRequest(field, f"cannot read {kind}: file not found: {path}")
    if path.stat().st_size == 0:
        raise InvalidRequest(field, f"cannot read {kind}: file is empty: {path}")


def _check_pixels(width: int, height: int, limits: MediaLimits, field: str, kind: str) -> None:
    if width * height > limits.max_pixels:
        raise InvalidRequest(field, f"{kind} of {width}x{height} exceeds the limit of {limits.max_pixels} pixels")


def load_image(source: Source, width: int, height: int, field: str = "image",
               limits: MediaLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Read an image file or upload and return it fitted to (3, height, width), float32 in [-1, 1].
    Its size is checked against `limits` from the header, before any pixel is decoded."""
    _check_source(source, field, "image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            _check_pixels(*image.size, limits, field, "an image")
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:  # Pillow's own, larger limit, checked as it opens the file
        raise InvalidRequest(field, f"the image exceeds the limit of {limits.max_pixels} pixels") from None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(field, f"cannot read image: {exc}") from exc
    return frames_to_tensor(np.asarray(_fit(rgb, width, height)))


@contextmanager
def _as_path(source: Source) -> Iterator[str]:
    """A file path for `source`; bytes are written to a temporary file for ffmpeg."""
    if not isinstance(source, bytes):
        yield str(source)
        return
    with tempfile.TemporaryDirectory(prefix="pusa-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(source)
        yield str(path)


def _ffmpeg_problem(exc: Exception) -> str:
    """The most telling line of an imageio-ffmpeg error (which embeds ffmpeg's whole stderr)."""
    lines = [re.sub(r"^\[[^\]]*\]\s*", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    problems = [line for line in lines if _FFMPEG_PROBLEM.search(line)]
    return (problems or lines or [type(exc).__name__])[0]


def _bounded(frames: Iterator[bytes], shape: tuple[int, int, int], limits: MediaLimits,
             field: str) -> Iterator[np.ndarray]:
    """The decoded frames as arrays, failing past `limits.max_frames` frames or `limits.timeout_s`."""
    deadline = time.monotonic() + limits.timeout_s
    for count, frame in enumerate(frames, 1):
        if count > limits.max_frames:
            raise InvalidRequest(field, f"the video has more than {limits.max_frames} frames")
        if time.monotonic() > deadline:
            raise InvalidRequest(field, f"the video took longer than {limits.timeout_s:g} s to decode")
        yield np.frombuffer(frame, dtype=np.uint8).reshape(shape)


def _demuxed_frames(path: str, limits: MediaLimits, field: str) -> int:
    """The first video stream's frame count, read by demuxing its packets without decoding them (ffmpeg's
    stream copy into nothing): milliseconds for an upload, where a decoding count costs a full decode."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path, "-map", "0:v:0", "-c", "copy",
           "-f", "null", "-"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        raise InvalidRequest(field, f"the video took longer than {limits.timeout_s:g} s to read") from None
    counts = re.findall(r"frame=\s*(\d+)", done.stderr)
    return int(counts[-1]) if counts else 0


@contextmanager
def _read_video(source: Source, field: str, limit: int | None,
                limits: MediaLimits = DEFAULT_LIMITS) -> Iterator[tuple[dict, Iterator[np.ndarray]]]:
    """Open a video with ffmpeg: yield its metadata and an iterator over at most `limit` frames.

    Frames are uint8 (H, W, 3), in decoding order, one per decoded frame (no frame-rate conversion);
    ffmpeg stops after `limit` frames (None: all, up to one past `limits.max_frames`). The frame size,
    the frame count and the duration (read from the container without decoding) are checked against
    `limits` before any frame is decoded. Any decoding failure becomes InvalidRequest(field, ...).
    """
    _check_source(source, field, "video")
    params = ["-map", "0:v:0", "-fps_mode", "passthrough", "-frames:v", str(limit or limits.max_frames + 1)]
    with _as_path(source) as path:
        reader = imageio_ffmpeg.read_frames(path, output_params=params)
        try:
            meta = next(reader)
            width, height = meta["size"]
            _check_pixels(width, height, limits, field, "a video frame")
            # Duration from the container's header, frames by demuxing: nothing decoded yet. The frame count and the
            # decode time are enforced again while decoding (`_bounded`), for files whose container lies.
            seconds = float(meta.get("duration") or 0)
            if seconds > limits.max_seconds:
                raise InvalidRequest(field, f"the video lasts {seconds:g} s; the limit is {limits.max_seconds:g} s")
            frames = _demuxed_frames(path, limits, field)
            if frames > limits.max_frames:
                raise InvalidRequest(field, f"the video has {frames} frames; the limit is {limits.max_frames}")
            yield meta, _bounded(reader, (height, width, 3), limits, field)
        except InvalidRequest:
            raise
        except (OSError, RuntimeError, ValueError, IndexError) as exc:
            raise InvalidRequest(field, f"cannot read video: {_ffmpeg_problem(exc)}") from exc
        finally:
            reader.close()


def load_video(
    source: Source, width: int, height: int, num_frames: int, field: str = "video", from_end: bool = False,
    limits: MediaLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Read the first (or, with `from_end`, the last) `num_frames` frames of a video file or upload,
    each fitted to height x width, within `limits`.

    Returns float32 (3, num_frames, height, width) in [-1, 1].
    """
    with _read_video(source, field, None if from_end else num_frames, limits) as (_, frames):
        # each frame fitted as it is decoded: the last frames kept are small ones, never `num_frames` raw frames
        fitted = (np.asarray(_fit(Image.fromarray(frame), width, height)) for frame in frames)
        fitted = list(collections.deque(fitted, maxlen=num_frames) if from_end else fitted)
    if len(fitted) < num_frames:
        raise InvalidRequest(field, f"video has {len(fitted)} frames; this request needs at least {num_frames}")
    return frames_to_tensor(np.stack(fitted))


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] -> uint8 (T, H, W, 3), clamped and rounded."""
    pixels = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


class Mp4Writer:
    """A browser-playable H.264 MP4 (yuv420p, faststart) written from uint8 ``(t, H, W, 3)`` chunks as they
    come: a thread feeds ffmpeg, which encodes earlier frames while the caller makes later ones.

    H and W must be multiples of 16, so frames are stored exactly as given, never rescaled. Use as a
    context manager; the file is complete when it exits (an error in ffmpeg is raised there, or by the
    next `write`)."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int) -> None:
        if height % 16 or width % 16:
            raise ValueError(f"frame size {width}x{height} is not a multiple of 16")
        self.shape = (height, width, 3)
        self.path = Path(path)
        self._writer = imageio_ffmpeg.write_frames(
            str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
            macro_block_size=16, output_params=["-crf", "18", "-movflags", "+faststart"],
        )
        self._writer.send(None)
        self._feeder = ThreadPoolExecutor(1, thread_name_prefix="mp4-writer")  # one thread: frames stay in order
        self._sent: Future | None = None
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        """Queue uint8 ``(t, H, W, 3)`` frames for the encoder; returns at once."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != self.shape:
            raise ValueError(f"expected uint8 frames (t, {', '.join(map(str, self.shape))}), got {frames.dtype} {frames.shape}")
        if self._sent is not None and self._sent.done():
            self._sent.result()  # an earlier chunk failed: say so now
        self._sent = self._feeder.submit(self._send, frames)
        self.frames += len(frames)

    def _send(self, frames: np.ndarray) -> None:
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        """Wait for every queued frame to be encoded and finish the file."""
        self._feeder.shutdown(wait=True)
        try:
            if self._sent is not None:
                self._sent.result()
            if not self.frames:
                raise ValueError("an MP4 needs at least one frame")
        finally:
            self._writer.close()
        if not self.path.is_file() or not self.path.stat().st_size:  # imageio-ffmpeg ignores ffmpeg's exit code
            raise OSError(f"ffmpeg wrote no video to {self.path}")

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_mp4_chunks(chunks: Iterable[np.ndarray], path: str | Path, fps: int) -> np.ndarray:
    """Write uint8 ``(t, H, W, 3)`` chunks of frames as one MP4 (`Mp4Writer`, sized by the first chunk), each
    encoded while the next is made; returns all the frames."""
    kept: list[np.ndarray] = []
    writer: Mp4Writer | None = None
    try:
        for chunk in chunks:
            if writer is None:
                writer = Mp4Writer(path, chunk.shape[2], chunk.shape[1], fps)
            writer.write(chunk)
            kept.append(chunk)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("an MP4 needs at least one frame")
    return np.concatenate(kept)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> None:
    """Write uint8 (T, H, W, 3) frames as an MP4 (`Mp4Writer`'s format)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    write_mp4_chunks([frames], path, fps)


def write_thumbnail(frames: np.ndarray, path: str | Path | io.BytesIO) -> None:
    """Write the middle frame of uint8 (T, H, W, 3) frames as a WebP image."""
    Image.fromarray(frames[len(frames) // 2]).save(path, format="WEBP", quality=90)


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    """uint8 (T, H, W, 3) frames as the bytes of their MP4 (`write_mp4`)."""
    with tempfile.TemporaryDirectory(prefix="pusa-video-") as folder:
        video = Path(folder) / "video.mp4"
        write_mp4(frames, video, fps)
        return video.read_bytes()


def thumbnail_bytes(frames: np.ndarray) -> bytes:
    """The WebP thumbnail (`write_thumbnail`) of uint8 (T, H, W, 3) frames, as bytes."""
    thumbnail = io.BytesIO()
    write_thumbnail(frames, thumbnail)
    return thumbnail.getvalue()


def video_files(frames: np.ndarray, fps: int) -> tuple[bytes, bytes]:
    """uint8 (T, H, W, 3) frames as the bytes of their MP4 (`mp4_bytes`) and WebP thumbnail."""
    return mp4_bytes(frames, fps), thumbnail_bytes(frames)


def probe_video(path: str | Path) -> dict:
    """Width, height, frame count, fps and codec name (e.g. "h264") of a video file.

    Frames are counted by decoding the whole file. Unreadable files raise InvalidRequest("video", ...).
    """
    with _read_video(path, "video", 1) as (meta, _):
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    codec = meta["codec"].rstrip(",")  # ffmpeg prints e.g. "Video: gif, bgra, ..."
    return {"width": width, "height": height, "frames": frames, "fps": meta["fps"], "codec": codec}
