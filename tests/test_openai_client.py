"""OpenAI's own Python SDK (`openai`) drives the video API of the local profile on a real local Ray.

The SDK sends every create/extend as multipart/form-data: `extra_body` lists become repeated
`name[]` fields and objects `name[key]` fields, which the router must accept.

The module's service is the local profile as it is (no setting changed), so it also carries the smoke test:
a text-to-video job over plain HTTP with the profile's defaults.
"""

from __future__ import annotations

import base64
import time

import httpx
import openai
import pytest
from videoapi import TERMINAL, image_bytes, mp4_bytes, wait_done

from pusa_model.media import probe_video
from serving import running_service

# openai 3.x marks the videos API deprecated (the Sora API shuts down); this service keeps its shape.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with running_service(str(tmp_path_factory.mktemp("store"))) as url:
        yield url


def test_the_local_profile_completes_a_t2v_job_over_http(url, tmp_path):
    """The smoke test: the local profile, deployed unchanged, completes a t2v job of its default shape."""
    job = httpx.post(f"{url}/v1/videos", json={"prompt": "a cat", "steps": 3, "seed": 5}, timeout=30).json()
    assert job["status"] == "queued" and job["pusa"]["seed"] == 5
    deadline = time.monotonic() + 120
    while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = httpx.get(f"{url}/v1/videos/{job['id']}", timeout=10).json()
    assert job["status"] == "completed", job
    video = httpx.get(f"{url}/v1/videos/{job['id']}/content", timeout=30)
    assert video.headers["content-type"] == "video/mp4"
    (tmp_path / "out.mp4").write_bytes(video.content)
    info = probe_video(tmp_path / "out.mp4")
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 17)


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def finished(client: openai.OpenAI, video_id: str, timeout: float = 120) -> openai.types.Video:
    deadline = time.monotonic() + timeout
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in TERMINAL or time.monotonic() > deadline:
            return video
        time.sleep(0.25)


def check_download(client: openai.OpenAI, video_id: str, tmp_path, frames: int, size=(64, 64)) -> None:
    content = client.videos.download_content(video_id)
    assert content.response.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{video_id}.mp4"
    content.write_to_file(path)
    info = probe_video(path)
    assert (info["width"], info["height"], info["frames"]) == (*size, frames), info
    thumb = client.videos.download_content(video_id, variant="thumbnail").content
    assert thumb[:4] == b"RIFF" and thumb[8:12] == b"WEBP"


@pytest.fixture(scope="module")
def t2v(client) -> openai.types.Video:
    video = client.videos.create(prompt="a cat walks on the grass", model="pusa-v1", size="64x64", seconds="1",
                                 extra_body={"steps": 2, "seed": 3, "task": "t2v"})
    assert video.status == "queued" and video.model == "pusa-v1" and video.size == "64x64"
    assert video.model_extra["pusa"]["seed"] == 3 and video.model_extra["pusa"]["frames"] == 25
    done = finished(client, video.id)
    assert done.status == "completed", done
    return done


def test_create_t2v_and_download(client, t2v, tmp_path):
    assert t2v.progress == 100 and t2v.seconds == "1" and t2v.prompt == "a cat walks on the grass"
    assert t2v.model_extra["pusa"]["steps"] == 2 and t2v.model_extra["pusa"]["task"] == "t2v"
    check_download(client, t2v.id, tmp_path, frames=25)


def test_create_and_poll_i2v_upload(client, tmp_path):
    png = tmp_path / "start.png"
    png.write_bytes(image_bytes("PNG", size=(96, 72)))
    with open(png, "rb") as f:
        video = client.videos.create_and_poll(
            prompt="the camera pans slowly", input_reference=f, size="64x64", poll_interval_ms=200,
            extra_body={"steps": 2, "seed": 8, "noise_multiplier": 0.3, "frames": 9},
        )
    assert video.status == "completed", video
    assert video.model_extra["pusa"]["task"] == "i2v" and video.model_extra["pusa"]["seed"] == 8
    check_download(client, video.id, tmp_path, frames=9)


def test_input_reference_image_url_object(client, tmp_path):
    """An image reference object arrives as the form field `input_reference[image_url]`. (openai 3.51 accepts
    only files for `input_reference=` at run time, despite its type, so the object rides in `extra_body`.)"""
    data_url = "data:image/jpeg;base64," + base64.b64encode(image_bytes("JPEG", seed=4)).decode()
    video = client.videos.create(prompt="a still life",
                                 extra_body={"input_reference": {"image_url": data_url}, "steps": 2, "frames": 9})
    assert video.model_extra["pusa"]["task"] == "i2v"
    assert finished(client, video.id).status == "completed"
    check_download(client, video.id, tmp_path, frames=9)


def test_lists_in_extra_body(client, tmp_path):
    """Lists in `extra_body` are sent as repeated `images[]`, `positions[]`, `multipliers[]` fields."""
    images = ["data:image/png;base64," + base64.b64encode(image_bytes(fmt, seed=i)).decode()
              for i, fmt in enumerate(("PNG", "WEBP", "JPEG"))]
    video = client.videos.create(
        prompt="keyframes", size="64x64",
        extra_body={"task": "multi_frame", "images": images, "positions": [0, 2, 4], "multipliers": [0.1, 0.4, 0.6],
                    "steps": 2},
    )
    assert video.model_extra["pusa"]["task"] == "multi_frame"
    assert finished(client, video.id).status == "completed"
    check_download(client, video.id, tmp_path, frames=17)

    with pytest.raises(openai.BadRequestError) as err:  # the lists really arrive: a duplicate is caught
        client.videos.create(prompt="k", extra_body={"task": "multi_frame", "images": images[:2], "positions": [3, 3]})
    assert err.value.param == "positions" and "more than once" in err.value.message


def extend_by_id(client: openai.OpenAI, video_id: str, **kwargs) -> openai.types.Video:
    """`videos.extend(video={"id": ...})`. openai 3.51 rejects a reference object for `video=` before sending
    (extract_files wants a file), so pass it in `extra_body`: the same `video[id]` form field goes out."""
    extra = {"video": {"id": video_id}, **kwargs.pop("extra_body", {})}
    return client.videos.extend(video=openai.omit, extra_body=extra, **kwargs)


def test_extend_completed_video(client, t2v, tmp_path):
    video = extend_by_id(client, t2v.id, prompt="and then it runs", seconds="1", extra_body={"steps": 2, "seed": 5})
    assert video.model_extra["pusa"]["extended_from"] == t2v.id and video.model_extra["pusa"]["task"] == "v2v"
    done = finished(client, video.id)
    assert done.status == "completed", done
    check_download(client, video.id, tmp_path, frames=25)


def test_extend_uploaded_video(client, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(mp4_bytes(17, seed=2))
    with open(clip, "rb") as f:
        video = client.videos.extend(video=f, prompt="continue", seconds="1", extra_body={"steps": 2, "frames": 17})
    assert video.model_extra["pusa"]["extended_from"] is None
    assert finished(client, video.id).status == "completed"
    check_download(client, video.id, tmp_path, frames=17)


def test_list_pagination(client, url):
    mine = [client.videos.create(prompt=f"list {i}", extra_body={"steps": 1, "frames": 5}).id for i in range(3)]
    first = client.videos.list(limit=2)
    assert [v.id for v in first.data] == mine[:0:-1] and first.has_more
    everything = [v.id for v in client.videos.list(limit=2)]  # the SDK follows `after` = last_id
    assert everything[:3] == mine[::-1] and everything == sorted(everything, reverse=True)
    assert len(everything) == len(set(everything))
    ascending = [v.id for v in client.videos.list(limit=2, order="asc")]
    assert ascending == everything[::-1]
    page = client.videos.list(limit=1, after=mine[2])
    assert [v.id for v in page.data] == [mine[1]]
    for video_id in mine:
        assert wait_done(url, video_id)["status"] == "completed"


def test_delete(client):
    video = client.videos.create(prompt="delete me", extra_body={"steps": 1, "frames": 5})
    assert finished(client, video.id).status == "completed"
    deleted = client.videos.delete(video.id)
    assert deleted.deleted is True and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)


def test_download_unfinished_is_conflict(client, url):
    video = client.videos.create(prompt="long", extra_body={"steps": 30})
    with pytest.raises(openai.ConflictError) as err:
        client.videos.download_content(video.id)
    assert err.value.param == "video_id"
    httpx.post(f"{url}/v1/videos/{video.id}/cancel", timeout=30)
    assert finished(client, video.id).status == "cancelled"


@pytest.mark.parametrize(
    "kwargs,param,words",
    [
        ({"extra_body": {"steps": 99}}, "steps", "less than or equal to 50"),
        ({"size": "100x64"}, "size", "multiples of 16"),
        ({"model": "sora-2"}, "model", "unknown model 'sora-2'"),
        ({"seconds": "4", "extra_body": {"frames": 80}}, "frames", "4k+1"),
        ({"extra_body": {"task": "i2v"}}, "images", "exactly one image"),
        ({"extra_body": {"guidence": 3}}, "guidence", "Extra inputs are not permitted"),
        ({"input_reference": ("x.png", b"not a png", "image/png")}, "images[0]", "cannot read image"),
    ],
    ids=["steps", "size", "model", "frames", "i2v-no-image", "unknown-field", "garbage-upload"],
)
def test_invalid_request_raises_bad_request(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt="p", **kwargs)
    assert err.value.status_code == 400 and err.value.param == param
    assert words in err.value.message and param in err.value.message, err.value.message


def test_extend_invalid(client, t2v):
    with pytest.raises(openai.BadRequestError) as err:
        extend_by_id(client, t2v.id, prompt="p", seconds="1", extra_body={"steps": 0})
    assert err.value.param == "steps"
    with pytest.raises(openai.NotFoundError):
        extend_by_id(client, "video_000000000000aaaaaaaaaaaa", prompt="p", seconds="1")
    with pytest.raises(openai.BadRequestError) as err:  # an extension needs 4 latent frames
        extend_by_id(client, t2v.id, prompt="p", seconds="1", extra_body={"frames": 9})
    assert err.value.param == "frames"


def test_unknown_id_raises_not_found(client):
    missing = "video_000000000000aaaaaaaaaaaa"
    for call in (client.videos.retrieve, client.videos.download_content, client.videos.delete):
        with pytest.raises(openai.NotFoundError) as err:
            call(missing)
        assert missing in err.value.message
