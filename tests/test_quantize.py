"""8-bit fast paths (pusa_model.quantize) on the CPU with the tiny preset: SageAttention and FP8 fall back
with a warning naming why, INT8 GEMMs are applied and stay close, a LoRA is fused first, then quantized,
and a request in mode fast runs the ``fast_attention`` kernel (warmed up beside the default one)."""

import logging

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models import attention_dispatch

from pusa_model import quantize
from pusa_model.dit import DiTStage
from pusa_model.lora import LoraFuser
from pusa_model.presets import tiny_transformer_config
from pusa_model.quantize import QuantizationError, block_linears, gemm_blocker, is_quantized, sage_blocker
from pusa_model.transformer import DiTOptions, apply_options, forward_per_frame

# Measured on the tiny preset (float32, six seeds): ‖int8 − fp32‖ / ‖fp32‖ = 0.20–0.21% of the output
# (casting the same model to bf16 gives 0.53–0.59%). The bound leaves about 5× room.
INT8_REL_ERROR_BOUND = 0.01


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_transformer_config()).eval().requires_grad_(False)


def _copy(model):
    out = WanTransformer3DModel(**tiny_transformer_config()).eval().requires_grad_(False)
    out.load_state_dict(model.state_dict())
    return out


def _inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 8, generator=gen)
    text = torch.randn(1, 5, 32, generator=gen)
    tau = torch.rand(1, 3, generator=gen) * 1000
    return x, text, tau


def _forward(model, block_fn=None):
    x, text, tau = _inputs()
    with torch.no_grad():
        if block_fn is None:
            return forward_per_frame(model, x, tau, text)
        return forward_per_frame(model, x, tau, text, block_fn)


def _backend(model):
    return {str(getattr(b.attn1.processor._attention_backend, "value", b.attn1.processor._attention_backend))
            for b in model.blocks}


def test_sage_falls_back_on_cpu_with_the_reason(model, caplog):
    fast = _copy(model)
    with caplog.at_level(logging.WARNING, logger="pusa_model"):
        block_fn = apply_options(fast, DiTOptions(attention="sage"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'sage' requested" in w and "CUDA GPUs only" in w and "cpu" in w and "'native'" in w
               for w in warnings), warnings
    assert _backend(fast) == {"native"}
    torch.testing.assert_close(_forward(fast, block_fn), _forward(model), rtol=0, atol=0)


def test_sage_blocker_names_each_reason(monkeypatch):
    cuda = torch.device("cuda", 0)
    bf16 = torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0" in sage_blocker(cuda, bf16, 128)
    assert "sm75" in sage_blocker(cuda, bf16, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "bf16 or fp16" in sage_blocker(cuda, torch.float32, 128)
    assert "head dims" in sage_blocker(cuda, bf16, 16)
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_SAGE_ATTN", False)

    def missing():
        raise ModuleNotFoundError("No module named 'sageattention'", name="sageattention")

    monkeypatch.setattr(quantize, "_import_sage", missing)
    reason = sage_blocker(cuda, bf16, 128)
    assert "not installed" in reason and "pusa-serve[fast]" in reason

    def no_triton():
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(quantize, "_import_sage", no_triton)
    assert "failed to import" in sage_blocker(cuda, bf16, 128) and "triton" in sage_blocker(cuda, bf16, 128)
    monkeypatch.setattr(quantize, "_import_sage", lambda: type("M", (), {"sageattn": staticmethod(lambda: 0)}))
    assert sage_blocker(cuda, bf16, 128) is None


def test_fp8_falls_back_on_cpu_with_the_reason(model, caplog):
    fast = _copy(model)
    with caplog.at_level(logging.WARNING, logger="pusa_model"):
        block_fn = apply_options(fast, DiTOptions(quantize="fp8"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'fp8' requested" in w and "8.9" in w and "cpu" in w and "stay in float32" in w
               for w in warnings), warnings
    assert not any(is_quantized(linear) for linear in block_linears(fast).values())
    torch.testing.assert_close(_forward(fast, block_fn), _forward(model), rtol=0, atol=0)


def test_gemm_blocker_on_older_gpus(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "use quantize: int8" in gemm_blocker("fp8", cuda, torch.bfloat16)
    assert gemm_blocker("int8", cuda, torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gemm_blocker("fp8", cuda, torch.bfloat16) is None
    assert "bf16" in gemm_blocker("fp8", cuda, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "8.0" in gemm_blocker("int8", cuda, torch.bfloat16)


def test_options_are_validated():
    with pytest.raises(ValueError, match="quantize must be one of"):
        DiTOptions(quantize="int4")
    with pytest.raises(ValueError, match="fuse_qkv cannot be combined"):
        DiTOptions(quantize="int8", fuse_qkv=True)


def test_missing_torchao_is_a_clear_error(model, monkeypatch):
    def no_torchao(name):
        raise ModuleNotFoundError("No module named 'torchao'", name="torchao")

    monkeypatch.setattr(quantize.importlib, "import_module", no_torchao)
    with pytest.raises(QuantizationError, match=r"quantize needs torchao \(pip install 'pusa-serve\[fast\]'\)"):
        apply_options(_copy(model), DiTOptions(quantize="int8"))


def test_int8_quantizes_the_block_linears_and_stays_close(model):
    pytest.importorskip("torchao")
    fast = _copy(model)
    block_fn = apply_options(fast, DiTOptions(quantize="int8"))
    linears = block_linears(fast)
    assert len(linears) == 2 * 10  # per block: q, k, v, out of both attentions, and the two FFN layers
    assert all(is_quantized(linear) for linear in linears.values())
    assert all(linear.weight.qdata.dtype == torch.int8 for linear in linears.values())
    others = [m for n, m in fast.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("blocks.")]
    assert others and not any(is_quantized(m) for m in others)  # embedders and the output head stay
    ref, out = _forward(model), _forward(fast, block_fn)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < INT8_REL_ERROR_BOUND, rel


def _lora(model, rank=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, linear in block_linears(model).items():
        state[f"{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=gen) * 0.1
    return state


def _qweights(model):
    return {n: (lin.weight.qdata.clone(), lin.weight.scale.clone()) for n, lin in block_linears(model).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def test_lora_is_fused_first_then_quantized(model):
    pytest.importorskip("torchao")
    lora = _lora(model)
    base = {f"{n}.weight": lin.weight.detach().clone() for n, lin in block_linears(model).items()}

    # Quantized at load, then the LoRA fused at 0.7: every write re-quantizes W0 + 0.7·BA.
    fast = _copy(model)
    quantize.quantize_blocks(fast, "int8")
    quantized_w0 = _qweights(fast)
    fuser = LoraFuser(fast, lora, base_weights=base)
    fuser.fuse(0.7)
    assert all(is_quantized(linear) for linear in block_linears(fast).values())

    # The reference order: fuse at 0.7 in float, then quantize.
    ref = _copy(model)
    LoraFuser(ref, lora).fuse(0.7)
    quantize.quantize_blocks(ref, "int8")
    assert _same(_qweights(fast), _qweights(ref))
    torch.testing.assert_close(_forward(fast), _forward(ref), rtol=0, atol=0)

    # A switch re-quantizes from the base weights, never accumulating: 0.7 -> 1.4 -> 0.7 and back to 0.
    at_07 = _qweights(fast)
    fuser.fuse(1.4)
    assert not _same(_qweights(fast), at_07)
    fuser.fuse(0.7)
    assert _same(_qweights(fast), at_07)
    fuser.fuse(0.0)
    assert _same(_qweights(fast), quantized_w0)


def test_dit_stage_with_int8_and_a_lora(model):
    pytest.importorskip("torchao")
    lora = _lora(model)
    plain_model, fast_model = _copy(model), _copy(model)
    plain = DiTStage(plain_model, LoraFuser(plain_model, lora), DiTOptions())
    fast = DiTStage(fast_model, LoraFuser(fast_model, lora), DiTOptions(quantize="int8"))
    x, text, tau = _inputs(seed=5)
    outs = []
    for alpha in (1.4, 0.5):
        plain.set_lora_alpha(alpha)
        fast.set_lora_alpha(alpha)
        with torch.no_grad():
            ref, out = plain.velocity(x, tau, text), fast.velocity(x, tau, text)
        assert ((out - ref).norm() / ref.norm()).item() < INT8_REL_ERROR_BOUND
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the alpha switch reached the quantized weights


def _step(stage, mode):
    x, text, _ = _inputs(seed=7)
    sigmas, multipliers = torch.tensor([1.0, 0.6, 0.0]), torch.tensor([1.0, 0.5, 1.0])
    return stage.step(x, 0, sigmas, multipliers, text, None, 1.0, mode=mode)


def test_a_fast_request_runs_the_fast_attention_kernel(model):
    stage = DiTStage(_copy(model), options=DiTOptions(fast_attention="_native_math"))
    assert stage.attention == "native"
    standard = _step(stage, "standard")
    assert stage.attention == "native" and _backend(stage.transformer) == {"native"}
    fast = _step(stage, "fast")
    assert _backend(stage.transformer) == {"_native_math"}  # every block switched, not only the first
    torch.testing.assert_close(fast, standard, rtol=1e-5, atol=1e-5)  # another kernel, the same attention
    assert torch.equal(_step(stage, "standard"), standard) and stage.attention == "native"  # and back
    plain = DiTStage(_copy(model), options=DiTOptions())  # without fast_attention a fast request changes nothing
    assert torch.equal(_step(plain, "fast"), standard) and plain.attention == "native"


def test_fast_attention_sage_falls_back_on_cpu_with_the_reason(model, caplog):
    stage = DiTStage(_copy(model), options=DiTOptions(fast_attention="sage"))
    standard = _step(stage, "standard")
    with caplog.at_level(logging.WARNING, logger="pusa_model"):
        fast = _step(stage, "fast")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'sage' requested" in w and "CUDA GPUs only" in w and "'native'" in w for w in warnings), warnings
    assert stage.attention == "native" and torch.equal(fast, standard)


def test_warm_up_runs_each_attention_kernel_a_request_mode_gets(model):
    stage = DiTStage(_copy(model), options=DiTOptions(fast_attention="_native_math"))
    seen = []
    velocity = stage.velocity
    stage.velocity = lambda *args: seen.append(stage.attention) or velocity(*args)
    stage.warm_up(width=64, height=64, frames=5, guidance=5.0)
    assert seen == ["native", "native", "_native_math", "_native_math"]  # two passes (guidance) per kernel
