"""`pusa checkpoint`: random weights in the layout the pusa-v1 preset loads, from a folder and from S3."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from s3server import S3Server, s3_server_fixture, use_test_credentials
from safetensors.torch import load_file

from pusa_cli import main
from pusa_model.devices import cap_gpu_memory, pick_device, release_on_oom
from pusa_model.lora import load_lora_state_dict
from pusa_model.loras import LoraRegistry
from pusa_model.pipeline import PusaPipeline
from pusa_model.presets import WAN22_LORAS, tiny_transformer_config
from pusa_model.random_checkpoint import DISTILL_LORA_FILE, LIGHTNING_FILES, PUSA_LORA_FILE, UMT5_XXL
from pusa_model.request import parse_request, plan_request

s3_server = s3_server_fixture(scope="module")
REGISTRY = {"distill": {"path": DISTILL_LORA_FILE, "alpha": 1.0, "fast": True}}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("random") / "ckpt"
    out = tmp_path_factory.mktemp("out") / "summary.json"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["checkpoint", str(dest), "--size", "tiny", "--pusa-rank", "8", "--distill-rank", "4"]) == 0
    out.write_text(buf.getvalue())
    return dest, json.loads(buf.getvalue())


def test_the_layout_pusa_v1_loads(written):
    dest, summary = written
    assert json.loads((dest / "model_index.json").read_text())["transformer"] == ["diffusers", "WanTransformer3DModel"]
    for part in ("transformer", "text_encoder", "vae", "tokenizer"):
        assert (dest / part / ("tokenizer.json" if part == "tokenizer" else "config.json")).is_file()
        files = [p for p in (dest / part).rglob("*") if p.is_file()]
        assert summary["bytes"][part] == sum(p.stat().st_size for p in files)
    config = json.loads((dest / "transformer" / "config.json").read_text())
    assert config["num_layers"] == tiny_transformer_config()["num_layers"]

    # The Pusa LoRA as released: a torch file with PEFT keys, rank 8 here, on q/k/v/o of both attentions and the FFN.
    pusa = torch.load(dest / PUSA_LORA_FILE, weights_only=True)
    assert "blocks.0.self_attn.q.lora_A.default.weight" in pusa and "blocks.1.ffn.2.lora_B.default.weight" in pusa
    assert pusa["blocks.0.self_attn.q.lora_A.default.weight"].shape[0] == 8
    assert len(pusa) == 2 * 10 * config["num_layers"]
    # The distill LoRA in LightX2V's form, with the bias and norm diffs it carries.
    distill = load_file(str(dest / DISTILL_LORA_FILE))
    prefix = "diffusion_model.blocks.0"
    for key in ("self_attn.q.lora_down.weight", "self_attn.q.lora_up.weight", "self_attn.q.alpha", "ffn.0.diff_b",
                "norm3.diff", "modulation.diff"):
        assert f"{prefix}.{key}" in distill
    assert distill[f"{prefix}.cross_attn.o.lora_down.weight"].shape[0] == 4
    # Both convert the way the service reads them.
    assert "blocks.0.attn1.to_q.lora_A.weight" in load_lora_state_dict(dest / PUSA_LORA_FILE)
    assert "blocks.0.norm2.weight.diff" in load_lora_state_dict(dest / DISTILL_LORA_FILE)


def test_real_sizes():
    """The real size is Wan2.1-T2V-14B's transformer and UMT5-XXL's encoder (counted without memory)."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel()
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    assert 14.2e9 < sum(p.numel() for p in transformer.parameters()) < 14.4e9
    assert 5.6e9 < sum(p.numel() for p in text_encoder.parameters()) < 5.8e9


def generate(folder: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setenv("PUSA_MODEL_SOURCE", folder)
    registry = LoraRegistry.model_validate(REGISTRY)
    pipe = PusaPipeline.from_preset("pusa-v1", device="cpu", loras=registry)
    body = {"prompt": "a cat", "mode": "fast", "steps": 2, "width": 64, "height": 64, "frames": 9, "seed": 3}
    plan = plan_request(parse_request(body), pipe.preset, loras=registry)
    assert plan.lora_combination == {"pusa": 1.4, "distill": 1.0}
    return pipe.generate(plan, tmp / "out.mp4").video_path.read_bytes()


def test_pusa_v1_runs_on_it_from_a_folder_and_from_s3(written, s3_server: S3Server, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    dest, _ = written
    use_test_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("PUSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PUSA_S3_ENDPOINT", s3_server.endpoint)
    client = s3_server.client()
    client.create_bucket(Bucket="models")
    for path in dest.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "models", f"random/{path.relative_to(dest)}")
    (tmp_path / "local").mkdir()
    (tmp_path / "s3").mkdir()
    local = generate(str(dest), tmp_path / "local", monkeypatch)
    from_s3 = generate("s3://models/random", tmp_path / "s3", monkeypatch)
    assert local[:8] != b"" and from_s3 == local
    assert (tmp_path / "cache" / "models" / "models").is_dir()  # the node-local copy of the prefix


def test_a_folder_with_files_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["checkpoint", str(tmp_path), "--size", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_memory_cap_needs_a_gpu_and_a_positive_size():
    assert pick_device("cpu", 4.0) == "cpu"
    assert cap_gpu_memory("cpu", 4.0) is None  # nothing to cap on the CPU
    with pytest.raises(ValueError, match="positive"):
        cap_gpu_memory("cpu", 0)


def test_a_cap_on_the_current_card_names_its_index(monkeypatch: pytest.MonkeyPatch):
    """Serve gives a replica "cuda"; the allocator's cap takes only an indexed device (torch 2.11 raises
    "Expected a torch.device with a specified index" for "cuda"), so the cap goes to the current card."""
    caps: list[tuple[float, torch.device]] = []

    def set_fraction(fraction: float, device: torch.device) -> None:  # torch's own check on the device
        if device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        caps.append((fraction, device))

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    assert cap_gpu_memory("cuda", 20.0) == 0.25
    assert cap_gpu_memory("cuda:0", 100.0) == 1.0  # never past the card
    assert caps == [(0.25, torch.device("cuda", 1)), (1.0, torch.device("cuda", 0))]


def test_out_of_memory_is_raised_again_after_the_memory_is_released():
    held = []

    def allocate_then_fail(n: int) -> None:
        held.append(torch.empty(n))
        raise torch.OutOfMemoryError(f"Tried to allocate {n} floats")

    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 1024 floats") as info:
        release_on_oom(allocate_then_fail, 1024)
    frames, tb = [], info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "allocate_then_fail" not in frames and info.value.__context__ is None  # its frames are let go
    assert release_on_oom(lambda a, b=0: a + b, 2, b=3) == 5


WAN22_REGISTRY = {"lightning": {"path": LIGHTNING_FILES[0], "path_2": LIGHTNING_FILES[1], "alpha": 1.0, "fast": True}}


def generate_wan22(folder: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setenv("PUSA_WAN22_SOURCE", str(folder))
    registry = LoraRegistry.model_validate(WAN22_REGISTRY)
    pipe = PusaPipeline.from_preset("pusa-wan2.2", device="cpu", loras=registry)
    body = {"prompt": "a cat", "mode": "fast", "width": 64, "height": 64, "frames": 9, "seed": 3}
    plan = plan_request(parse_request(body), pipe.preset, loras=registry)
    assert [plan.lora_combination_of(e) for e in (0, 1)] == [{"pusa": 1.5, "lightning": 1.0},
                                                             {"pusa": 1.4, "lightning": 1.0}]
    return pipe.generate(plan, tmp / "out.mp4").video_path.read_bytes()


def test_the_layout_pusa_wan22_loads(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Wan2.2-A14B's folder: two different experts, the boundary in the index, each expert's Pusa LoRA and a
    Lightning pair; the two-expert pipeline runs the fast mode on it."""
    dest = tmp_path / "wan22"
    assert main(["checkpoint", str(dest), "--model", "pusa-wan2.2", "--size", "tiny", "--pusa-rank", "8",
                 "--distill-rank", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    index = json.loads((dest / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.875
    high, low = (load_file(str(dest / part / "diffusion_pytorch_model.safetensors")) for part in ("transformer", "transformer_2"))
    assert high.keys() == low.keys() and not torch.equal(high["blocks.0.attn1.to_q.weight"], low["blocks.0.attn1.to_q.weight"])
    pusa = [load_file(str(dest / name)) for name in WAN22_LORAS]
    key = "blocks.0.self_attn.q.lora_A.default.weight"
    assert pusa[0][key].shape[0] == 8 and not torch.equal(pusa[0][key], pusa[1][key])  # each expert its own
    lightning = [load_file(str(dest / name)) for name in LIGHTNING_FILES]
    assert lightning[0]["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape[0] == 4
    assert set(summary["bytes"]) == {"transformer", "transformer_2", "tokenizer", "text_encoder", "vae",
                                     *WAN22_LORAS, *LIGHTNING_FILES}
    assert generate_wan22(dest, tmp_path, monkeypatch)[4:8] == b"ftyp"


def test_a_wan22_checkpoint_shares_the_pusa_v1_one(written, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch):
    """`--share-from`: the parts Wan2.2-A14B shares with Wan2.1, and the transformer as both experts, are links
    into the Pusa V1 folder; only the LoRAs are written, and the two-expert pipeline runs on it."""
    source, _ = written
    dest = tmp_path / "wan22"
    assert main(["checkpoint", str(dest), "--model", "pusa-wan2.2", "--size", "tiny", "--share-from", str(source),
                 "--pusa-rank", "8", "--distill-rank", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for part in ("tokenizer", "text_encoder", "vae"):
        assert (dest / part).is_symlink() and (dest / part).resolve() == (source / part).resolve()
    assert (dest / "transformer").resolve() == (dest / "transformer_2").resolve() == (source / "transformer").resolve()
    written_files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and not p.is_symlink()
                           and not any(parent.is_symlink() for parent in p.parents))
    assert written_files == sorted(["model_index.json", *WAN22_LORAS, *LIGHTNING_FILES])
    assert summary["bytes"]["transformer_2"] == summary["bytes"]["transformer"] > 0
    assert generate_wan22(dest, tmp_path, monkeypatch)[4:8] == b"ftyp"

    capsys.readouterr()
    assert main(["checkpoint", str(tmp_path / "v1"), "--size", "tiny", "--share-from", str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "share_from is for pusa-wan2.2" in err
