"""The video API with its blob store on S3 (a real SeaweedFS server), on the local profile on a real Ray:
inputs, checkpoints and results live in the bucket (the job records in the database), and a completed
job's URL is a presigned S3 URL."""

from __future__ import annotations

import time
from urllib.parse import urlparse

import httpx
import pytest
from s3server import s3_server_fixture
from videoapi import check_result, image_bytes, job_events, wait_done

from serving import running_service

BUCKET, PREFIX = "pusa-api", "svc/jobs"


s3 = s3_server_fixture(scope="module")


@pytest.fixture(scope="module")
def s3_env(s3, tmp_path_factory):
    """The server's endpoint and credentials, for the service and for this process; nothing else AWS."""
    env = s3.service_env()
    blank = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(blank / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(blank / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name, value in env.items():
            mp.setenv(name, value)
        yield env


URL_TTL_S = 5


def public_endpoint(s3) -> str:
    """The same server under another name, as clients outside the cluster would reach it."""
    return s3.endpoint.replace("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def url(s3_env, s3):
    env = {**s3_env, "PUSA_S3_PUBLIC_ENDPOINT": public_endpoint(s3)}
    with running_service(f"s3://{BUCKET}/{PREFIX}", env=env, api={"result_url_ttl_s": URL_TTL_S}) as url:
        yield url


def keys(s3, job_id: str) -> set[str]:
    """Object keys of the bucket that belong to `job_id`, relative to the store prefix."""
    found = set()
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
        for item in page.get("Contents", []):
            key = item["Key"].removeprefix(f"{PREFIX}/")
            if job_id in key:
                found.add(key)
    return found


def test_job_on_s3_completes_with_presigned_url(url, s3, tmp_path):
    r = httpx.post(f"{url}/v1/videos", json={"prompt": "a cat", "steps": 2, "seed": 1}, timeout=30)
    assert r.status_code == 200, r.text
    job = r.json()
    done = wait_done(url, job["id"])
    assert done["status"] == "completed", done
    check_result(url, job["id"], 64, 64, 17, tmp_path)

    completed = job_events(url, job["id"])[-1]
    assert completed["type"] == "completed"
    urls = done["pusa"]["urls"]
    assert urls["expires_in"] == URL_TTL_S
    for link, key in ((completed["url"], "video.mp4"), (urls["video"], "video.mp4"), (urls["thumbnail"], "thumbnail.webp")):
        presigned = urlparse(link)
        assert f"{presigned.scheme}://{presigned.netloc}" == public_endpoint(s3)  # not the service's own endpoint
        assert presigned.path == f"/{BUCKET}/{PREFIX}/results/{job['id']}/{key}"
        assert "X-Amz-Signature=" in presigned.query and f"X-Amz-Expires={URL_TTL_S}" in presigned.query
    direct = httpx.get(completed["url"], timeout=30)  # no credentials: the signature is the authorization
    assert direct.status_code == 200, direct.text
    assert direct.content == httpx.get(f"{url}/v1/videos/{job['id']}/content", timeout=30).content
    assert direct.content[4:8] == b"ftyp"
    assert httpx.get(urls["thumbnail"], timeout=30).content[8:12] == b"WEBP"
    unsigned = httpx.get(completed["url"].split("?")[0], timeout=30)
    assert unsigned.status_code in (401, 403)
    time.sleep(URL_TTL_S + 1.5)
    assert httpx.get(urls["video"], timeout=30).status_code == 403  # expired, checked by the S3 server
    fresh = httpx.get(f"{url}/v1/videos/{job['id']}", timeout=30).json()["pusa"]["urls"]["video"]
    assert httpx.get(fresh, timeout=30).status_code == 200  # each view signs anew

    # the results; the step checkpoints are gone once the job is done
    assert keys(s3, job["id"]) == {f"results/{job['id']}/video.mp4", f"results/{job['id']}/thumbnail.webp"}


def test_uploads_and_delete_on_s3(url, s3, tmp_path):
    png = image_bytes("PNG", seed=3)
    r = httpx.post(f"{url}/v1/videos", files={"input_reference": ("a.png", png, "image/png")},
                   data={"prompt": "pan", "steps": "2", "frames": "9"}, timeout=30)
    assert r.status_code == 200, r.text
    video_id = r.json()["id"]
    stored = s3.client().get_object(Bucket=BUCKET, Key=f"{PREFIX}/inputs/{video_id}/images[0]")["Body"].read()
    assert stored == png
    assert wait_done(url, video_id)["status"] == "completed"
    check_result(url, video_id, 64, 64, 9, tmp_path)
    listed = httpx.get(f"{url}/v1/videos", params={"limit": 1}, timeout=30).json()
    assert listed["data"][0]["id"] == video_id

    r = httpx.delete(f"{url}/v1/videos/{video_id}", timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert keys(s3, video_id) == set()
    assert httpx.get(f"{url}/v1/videos/{video_id}", timeout=30).status_code == 404

