"""The video API with its blob store on S3 (a real SeaweedFS server), on the local profile on a real Ray:
inputs, checkpoints and results live in the bucket (the job records in the database), and a completed
job's URL is a presigned S3 URL."""

from __future__ import annotations

from urllib.parse import urlparse

import httpx
import pytest
from s3server import REGION, running_s3_server
from videoapi import check_result, image_bytes, job_events, wait_done

from serving import running_service

BUCKET, PREFIX = "pusa-api", "svc/jobs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="module")
def s3_env(s3, tmp_path_factory):
    """The server's endpoint and credentials, for the service and for this process; nothing else AWS."""
    env = {"PUSA_S3_ENDPOINT": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
           "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": REGION}
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


@pytest.fixture(scope="module")
def url(s3_env):
    with running_service(f"s3://{BUCKET}/{PREFIX}", env=s3_env) as url:
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


def test_health_names_the_s3_store(url):
    assert httpx.get(f"{url}/health", timeout=30).json()["store"] == f"s3://{BUCKET}/{PREFIX}"


def test_job_on_s3_completes_with_presigned_url(url, s3, tmp_path):
    r = httpx.post(f"{url}/v1/videos", json={"prompt": "a cat", "steps": 2, "seed": 1}, timeout=30)
    assert r.status_code == 200, r.text
    job = r.json()
    done = wait_done(url, job["id"])
    assert done["status"] == "completed", done
    check_result(url, job["id"], 64, 64, 17, tmp_path)

    completed = job_events(url, job["id"])[-1]
    assert completed["type"] == "completed"
    presigned = urlparse(completed["url"])
    assert f"{presigned.scheme}://{presigned.netloc}" == s3.endpoint
    assert presigned.path == f"/{BUCKET}/{PREFIX}/results/{job['id']}/video.mp4"
    assert "X-Amz-Signature=" in presigned.query and "X-Amz-Expires=" in presigned.query
    direct = httpx.get(completed["url"], timeout=30)  # no credentials: the signature is the authorization
    assert direct.status_code == 200, direct.text
    assert direct.content == httpx.get(f"{url}/v1/videos/{job['id']}/content", timeout=30).content
    assert direct.content[4:8] == b"ftyp"
    unsigned = httpx.get(completed["url"].split("?")[0], timeout=30)
    assert unsigned.status_code in (401, 403)

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

