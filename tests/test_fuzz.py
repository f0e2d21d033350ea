"""The live local service fuzzed from its own OpenAPI schema by schemathesis, with an API key and without:
no 5xx, no response outside the schema (status, content type, body, headers) and no request that hangs.
The cost limit keeps the jobs it manages to make small."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pusa_jobs.api_keys import KeyStore
from pusa_jobs.db import open_database
from serving import running_service

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
         "response_headers_conformance"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    database = f"sqlite:///{folder / 'jobs.db'}"
    api = {"auth": "keys", "cost": {"max_gpu_seconds": 2.0}, "max_queued_jobs": 4, "max_upload_bytes": 1 << 20}
    with running_service(str(folder / "store"), api=api, database=database) as url:
        _, secret = KeyStore(open_database(database)).create("fuzzer", "user")
        yield url, secret


def schemathesis(url: str, report: Path, *headers: str) -> subprocess.CompletedProcess:
    args = [Path(sys.executable).with_name("st"), "run", f"{url}/openapi.json", "--checks", CHECKS,
            "--max-examples", "25", "--phases", "examples,coverage,fuzzing", "--seed", "7", "--workers", "2",
            "--request-timeout", "60", "--generation-database", "none", "--no-color", "--report", "junit",
            "--report-junit-path", str(report)]
    for header in headers:
        args += ["-H", header]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=report.parent)


def test_schema_documents_every_route(service):
    url, _ = service
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    routes = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert routes == {("POST", "/v1/videos"), ("GET", "/v1/videos"), ("POST", "/v1/videos/extensions"),
                      ("POST", "/v1/videos/stream"), ("POST", "/v1/videos/plan"), ("GET", "/v1/videos/{video_id}"),
                      ("GET", "/v1/videos/{video_id}/content"), ("GET", "/v1/videos/{video_id}/events"),
                      ("POST", "/v1/videos/{video_id}/cancel"), ("DELETE", "/v1/videos/{video_id}"),
                      ("GET", "/v1/models"), ("GET", "/v1/loras"), ("GET", "/health"),
                      ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
                      ("GET", "/v1/files/{file_id}/content"), ("DELETE", "/v1/files/{file_id}"),
                      ("POST", "/v1/batches"), ("GET", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"),
                      ("POST", "/v1/batches/{batch_id}/cancel")}
    create = spec["paths"]["/v1/videos"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "size", "seconds", "input_reference", "noise_multiplier", "lora_alpha"} <= set(body["properties"])
    assert {"200", "400", "401", "413", "429"} <= set(create["responses"])
    plan = spec["paths"]["/v1/videos/plan"]["post"]  # the create's body; the plan as the response
    for media in ("application/json", "multipart/form-data"):
        plan_body = plan["requestBody"]["content"][media]["schema"]
        create_body = create["requestBody"]["content"][media]["schema"]
        assert set(plan_body["properties"]) == set(create_body["properties"]), media
        assert plan_body["required"] == create_body["required"] == ["prompt"], media
    assert plan["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/VideoPlan")
    upload = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["format"] == "binary" and set(upload["required"]) == {"file", "purpose"}
    batch = spec["paths"]["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    batch = spec["components"]["schemas"][batch["$ref"].rsplit("/", 1)[1]]
    assert set(batch["required"]) == {"input_file_id", "endpoint", "completion_window"}


@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
def test_schemathesis_finds_nothing(service, tmp_path, with_key):
    url, secret = service
    run = schemathesis(url, tmp_path / "junit.xml", *([f"Authorization: Bearer {secret}"] if with_key else []))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 500, run.stdout[-3000:]
