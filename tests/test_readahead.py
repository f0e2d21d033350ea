"""Reading a service's packages and checkpoint into the page cache while it starts (`pusa-serve --read-ahead`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.launch import checkpoint_paths
from deployments.serve_command import READ_AHEAD_PACKAGES
from pusa_model import readahead
from pusa_model.readahead import ReadAhead, checkpoint_order, files_under, package_folders


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return path


def test_every_byte_is_read_once_in_order_large_files_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "CHUNK", 1000)  # a 4,500-byte file: five read tasks on several threads
    monkeypatch.setattr(readahead, "BUFFER", 300)
    big = write(tmp_path / "b" / "big.bin", 4500)
    small = write(tmp_path / "a.bin", 10)
    nested = write(tmp_path / "b" / "c" / "d.bin", 700)
    (tmp_path / "link.bin").symlink_to(small)
    reader = ReadAhead([small, tmp_path / "b", tmp_path], threads=3, budget=10**9)
    done = reader.wait(timeout=30)
    assert done == {"done": True, "files": 3, "bytes": 5210, "planned_bytes": 5210, "skipped_files": 0,
                    "seconds": done["seconds"]}
    assert reader.files == [small, big, nested]  # given order, folders sorted, each file once, no symlink


def test_it_stops_at_its_budget(tmp_path):
    files = [write(tmp_path / f"{i}.bin", 400) for i in range(5)]
    reader = ReadAhead([tmp_path], budget=1000)
    assert reader.wait(timeout=30)["bytes"] == 800
    assert reader.files == files[:2] and reader.skipped == 3


def test_the_default_budget_is_a_share_of_the_available_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "available_memory", lambda: 1000)
    reader = ReadAhead([write(tmp_path / "a.bin", 700), write(tmp_path / "b.bin", 200)])
    assert reader.budget == 800 and reader.wait(timeout=30)["bytes"] == 700


def test_the_available_memory_is_the_systems():
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    reported = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(readahead.available_memory() - reported) < reported // 10


def test_packages_are_found_without_being_imported():
    import subprocess
    import sys

    code = ("import sys; from pusa_model.readahead import package_folders; "
            "print([f.name for f in package_folders(['sqlite3', 'no_such_package_here', 'yaml'])], 'yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['sqlite3', 'yaml'] False"


def test_a_checkpoint_is_read_transformer_and_loras_first(tmp_path):
    folder = tmp_path / "ckpt"
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "transformer/model-00001.safetensors", "tokenizer/tokenizer.json", "model_index.json",
                 "pusa_v1.pt", "loras/distill.safetensors"):
        write(folder / part, 100)
    outside = write(tmp_path / "style.safetensors", 100)
    order = checkpoint_order(folder, ["loras/distill.safetensors", str(outside), "s3://bucket/other.safetensors"])
    reader = ReadAhead(order, budget=10**9)
    reader.wait(timeout=30)
    names = [str(p.relative_to(tmp_path)) for p in reader.files]
    assert names == ["ckpt/transformer/model-00001.safetensors", "ckpt/model_index.json", "ckpt/pusa_v1.pt",
                     "ckpt/loras/distill.safetensors", "style.safetensors", "ckpt/text_encoder/model.safetensors",
                     "ckpt/vae/diffusion_pytorch_model.safetensors", "ckpt/tokenizer/tokenizer.json"]


def test_pusa_serve_reads_the_packages_and_each_apps_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "pusa-v1"
    write(folder / "transformer" / "model.safetensors", 50)
    write(folder / "distill.safetensors", 50)
    monkeypatch.setenv("PUSA_MODEL_SOURCE", str(folder))
    config = yaml.safe_load((Path(__file__).parent.parent / "serve_config.gpu.yaml").read_text())
    config["applications"][0]["args"]["loras"] = {"lightx2v": {"path": "distill.safetensors", "fast": True}}
    paths = checkpoint_paths(ServeDeploySchema.model_validate(config))
    reader = ReadAhead(paths, budget=10**9)
    reader.wait(timeout=60)
    assert reader.files == [folder / "transformer" / "model.safetensors", folder / "distill.safetensors"]
    assert json.loads(json.dumps(reader.wait()))["done"]
    packages = ReadAhead(package_folders(READ_AHEAD_PACKAGES), budget=10**6)  # planned only, a few files
    assert any("torch" in p.parts for p in packages.files)


def test_pusa_serve_reads_the_wan22_checkpoint_and_both_files_of_its_loras(tmp_path, monkeypatch):
    v1, wan = tmp_path / "pusa-v1", tmp_path / "wan22"
    write(v1 / "transformer" / "model.safetensors", 50)
    write(wan / "transformer_2" / "model.safetensors", 50)
    write(wan / "lightning" / "high.safetensors", 50)
    write(wan / "lightning" / "low.safetensors", 50)
    monkeypatch.setenv("PUSA_MODEL_SOURCE", str(v1))
    monkeypatch.setenv("PUSA_WAN22_SOURCE", str(wan))
    config = yaml.safe_load((Path(__file__).parent.parent / "serve_config.gpu.yaml").read_text())
    config["applications"][0]["args"].update(wan22_preset="pusa-wan2.2", wan22_loras={
        "lightning": {"path": "lightning/high.safetensors", "path_2": "lightning/low.safetensors", "fast": True}})
    files = list(files_under(checkpoint_paths(ServeDeploySchema.model_validate(config))))
    assert [p for p in files if wan in p.parents] == [
        wan / "lightning" / "high.safetensors", wan / "lightning" / "low.safetensors",
        wan / "transformer_2" / "model.safetensors"]
    assert v1 / "transformer" / "model.safetensors" in files
