"""The attention kernel per GPU (`pusa_model.attention.choose_attention`), its fallbacks and their reasons,
FlashAttention-3's FP8 quantization math, and the FA3 custom op inside a compiled DiT block on the CPU
(through the op's CPU reference implementation: the kernel itself needs an sm90 GPU)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models import attention_dispatch

from pusa_model import attention
from pusa_model.attention import (
    FA3_BACKEND,
    FA3_FP8_BACKEND,
    FP8_MAX,
    choose_attention,
    dequantize_fp8,
    enable_fa3,
    fa3_attention,
    fa3_forward,
    quantize_fp8,
    smooth_k,
)
from pusa_model.presets import tiny_transformer_config
from pusa_model.transformer import block_forward, compile_block_forward, forward_per_frame, select_attention_backend

H100, A6000, A100, L40S, T4 = (9, 0), (8, 6), (8, 0), (8, 9), (7, 5)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
ALL = {"fa3", "sage", "flash", "xformers"}


# ----------------------------------------------------------------------------------------------------
# Choosing per GPU


@pytest.mark.parametrize(
    ("capability", "available", "dtype", "kernel"),
    [
        (H100, {"fa3"}, BF16, "fa3"),  # FA3 bf16 on Hopper when fa3-fwd imports
        (H100, set(), BF16, "_native_cudnn"),  # without it: cuDNN SDPA
        (H100, {"fa3"}, FP16, "_native_cudnn"),  # the wheel has no fp16 kernels
        (H100, {"fa3"}, FP32, "native"),
        (A6000, ALL, BF16, "_native_flash"),  # exact kernels only: SageAttention is opt-in
        (A100, set(), FP16, "_native_flash"),
        (L40S, ALL, BF16, "_native_flash"),  # FA3 is sm90 only
        (T4, ALL, FP16, "native"),
        (None, ALL, FP32, "native"),  # the CPU
    ],
)
def test_auto_picks_per_gpu(capability, available, dtype, kernel):
    assert choose_attention("auto", capability, available, dtype) == attention.AttentionChoice(kernel)


@pytest.mark.parametrize(
    ("capability", "available", "kernel"),
    [
        (H100, ALL, "fa3_fp8"),
        (H100, {"sage"}, "_native_cudnn"),  # Hopper without fa3-fwd: not Sage, slower than cuDNN there
        (A6000, ALL, "sage"),
        (A6000, {"fa3", "flash"}, "_native_flash"),  # nothing 8-bit runs: auto's choice, said why
        (None, ALL, "native"),
    ],
)
def test_auto_8bit_picks_per_gpu(capability, available, kernel):
    choice = choose_attention("auto_8bit", capability, available, BF16)
    assert choice.kernel == kernel
    assert (choice.reason is None) == (kernel in ("fa3_fp8", "sage"))


def test_sdpa_is_auto_without_fa3():
    assert choose_attention("sdpa", H100, ALL, BF16).kernel == "_native_cudnn"
    assert choose_attention("sdpa", A6000, ALL, BF16).kernel == "_native_flash"
    assert choose_attention("sdpa", None, ALL, FP32).kernel == "native"


@pytest.mark.parametrize("preference", ["fa3", "fa3_fp8"])
def test_fa3_runs_where_it_can_and_falls_back_with_the_reason(preference):
    assert choose_attention(preference, H100, {"fa3"}, BF16) == attention.AttentionChoice(preference)

    not_installed = choose_attention(preference, H100, set(), BF16)
    assert not_installed.kernel == "_native_cudnn"
    assert "fa3-fwd package is not installed" in not_installed.reason and "pip install" in not_installed.reason

    broken = choose_attention(preference, H100, set(), BF16,
                              why_missing={"fa3": "fa3-fwd failed to import (OSError: libcudart.so.12)"})
    assert broken.kernel == "_native_cudnn" and "libcudart.so.12" in broken.reason

    ampere = choose_attention(preference, A6000, {"fa3"}, BF16)
    assert ampere.kernel == "_native_flash" and "sm90" in ampere.reason and "sm86" in ampere.reason

    cpu = choose_attention(preference, None, {"fa3"}, FP32)
    assert cpu.kernel == "native" and "no CUDA device" in cpu.reason

    fp16 = choose_attention(preference, H100, {"fa3"}, FP16)
    assert fp16.kernel == "_native_cudnn" and "bf16" in fp16.reason and "float16" in fp16.reason

    odd_head = choose_attention(preference, H100, {"fa3"}, BF16, head_dim=300)
    assert odd_head.kernel == "_native_cudnn" and "head dim" in odd_head.reason


def test_sage_flash_and_xformers_fall_back_with_the_reason():
    assert choose_attention("sage", A6000, {"sage"}, BF16) == attention.AttentionChoice("sage")
    missing = choose_attention("sage", A6000, set(), BF16)
    assert missing.kernel == "_native_flash" and "sageattention" in missing.reason
    old = choose_attention("sage", T4, {"sage"}, FP16)
    assert old.kernel == "native" and "sm75" in old.reason
    assert "head dims" in choose_attention("sage", A6000, {"sage"}, BF16, head_dim=256).reason

    assert choose_attention("flash", A6000, {"flash"}, BF16).kernel == "flash"  # the flash-attn package
    assert choose_attention("flash", A6000, set(), BF16) == attention.AttentionChoice("_native_flash")
    assert "no CUDA device" in choose_attention("flash", None, set(), FP32).reason

    assert choose_attention("xformers", A6000, {"xformers"}, BF16).kernel == "xformers"
    assert "xformers" in choose_attention("xformers", H100, set(), BF16).reason
    assert choose_attention("_native_math", H100, set(), BF16) == attention.AttentionChoice("_native_math")


def test_fa3_import_error_says_why(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'fa3_fwd_interface'", name="fa3_fwd_interface")

    monkeypatch.setattr(attention, "_import_fa3", missing)
    assert "not installed" in attention.fa3_import_error()

    def broken():
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(attention, "_import_fa3", broken)
    assert "failed to import" in attention.fa3_import_error() and "libcudart" in attention.fa3_import_error()
    monkeypatch.setattr(attention, "_import_fa3", lambda: type("M", (), {"flash_attn_func": staticmethod(print)}))
    assert attention.fa3_import_error() is None
    # Off sm90 the wheel is not even imported.
    monkeypatch.setattr(attention, "_import_fa3", missing)
    assert "fa3" not in attention.available_kernels(A6000)[0]
    assert "fa3" not in attention.available_kernels(H100)[0]
    assert "not installed" in attention.available_kernels(H100)[1]["fa3"]


# ----------------------------------------------------------------------------------------------------
# On this CPU machine: the model falls back, saying why


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_transformer_config()).eval().requires_grad_(False)


def _inputs(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 12, generator=gen)
    text = torch.randn(1, 12, model.config.text_dim, generator=gen)
    tau = torch.tensor([[175.0, 875.0, 875.0]])
    return x, tau, text


def _backends(model):
    return {(b.attn1.processor._attention_backend, b.attn2.processor._attention_backend) for b in model.blocks}


@pytest.mark.parametrize("preference", ["fa3", "fa3_fp8", "auto_8bit"])
def test_a_gpu_only_preference_falls_back_on_the_cpu_with_the_reason(model, preference, caplog):
    with caplog.at_level(logging.WARNING, logger="pusa_model"):
        assert select_attention_backend(model, preference) == "native"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{preference!r} requested" in w and "'native'" in w and "cpu" in w for w in warnings), warnings
    assert _backends(model) == {("native", "native")}


# ----------------------------------------------------------------------------------------------------
# FP8 math


def test_quantize_fp8_per_head_scales_and_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 3, 16, generator=gen)
    x[1, :, 2] *= 50  # one head far larger: it must get its own scale
    x[0, :, 1] = 0  # an all-zero head: no division by zero
    x8, descale = quantize_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert descale.shape == (2, 3) and descale.dtype == torch.float32
    amax = x.abs().amax(dim=(1, 3))
    nonzero = amax > 0
    torch.testing.assert_close(descale[nonzero], amax[nonzero] / FP8_MAX)
    # Each head's largest magnitude lands on 448, e4m3's largest finite value (exactly representable).
    assert torch.equal(x8.float().abs().amax(dim=(1, 3))[nonzero], torch.full_like(amax[nonzero], FP8_MAX))
    back = dequantize_fp8(x8, descale)
    assert torch.equal(back[0, :, 1], torch.zeros_like(back[0, :, 1]))
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself (relative), above the subnormals.
    big = x.abs() > descale[:, None, :, None] * 2**-6
    assert ((back - x).abs()[big] <= x.abs()[big] * 2**-4 + 1e-12).all()
    # Per-head scales: the large head does not crush the small ones (a per-tensor scale would).
    rel = (back[1, :, 0] - x[1, :, 0]).norm() / x[1, :, 0].norm()
    assert rel < 0.04
    per_tensor = x / (x.abs().max() / FP8_MAX)
    crushed = per_tensor.to(torch.float8_e4m3fn).float() * (x.abs().max() / FP8_MAX)
    assert (crushed[1, :, 0] - x[1, :, 0]).norm() / x[1, :, 0].norm() > rel


def test_k_smoothing_leaves_softmax_alone_and_cuts_the_fp8_error():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 32, generator=gen) for _ in range(3))
    k = k + 4 * torch.randn(1, 1, 2, 32, generator=gen)  # keys with a mean offset, as real ones have
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)  # noqa: E731
    exact = sdpa(q, k, v)
    smoothed = smooth_k(k)
    torch.testing.assert_close(smoothed.mean(dim=1), torch.zeros(1, 2, 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa(q, smoothed, v), exact, atol=1e-5, rtol=1e-5)  # softmax is invariant

    def fp8_error(smooth: bool) -> float:
        out, _ = fa3_forward(q, k, v, fp8=True, smooth=smooth)
        return ((out.float() - exact).norm() / exact.norm()).item()

    with_smoothing, without = fp8_error(True), fp8_error(False)
    assert with_smoothing < 0.6 * without, (with_smoothing, without)
    assert with_smoothing < 0.08  # random q, k: near-uniform attention, a small output to be relative to


def test_the_fp8_lse_is_the_true_one_despite_smoothing():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=gen) for _ in range(3))
    k = k + 2
    scale = 16**-0.5
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    exact = torch.logsumexp(logits, dim=-1)
    _, lse = fa3_forward(q, k, v, scale, fp8=True)
    assert lse.shape == (1, 2, 64)
    torch.testing.assert_close(lse, exact, atol=0.15, rtol=0.02)
    _, lse_bf = fa3_forward(q, k, v, scale)
    torch.testing.assert_close(lse_bf, exact, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# The custom op: its CPU reference equals SDPA, its fake gives the kernel's shapes, compiled and not


def test_the_op_cpu_reference_equals_sdpa_and_the_fake_has_the_kernel_shapes():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 40, 3, 16, generator=gen)
    k, v = torch.randn(2, 24, 3, 16, generator=gen), torch.randn(2, 24, 3, 16, generator=gen)
    out, lse = fa3_attention(q, k, v, None, None, None, 0.3)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert lse.shape == (2, 3, 40)
    torch.library.opcheck(fa3_attention, (q, k, v, None, None, None, 0.3))

    q8, k8, v8 = quantize_fp8(q), quantize_fp8(k), quantize_fp8(v)
    out8, _ = fa3_attention(q8[0], k8[0], v8[0], q8[1], k8[1], v8[1], 0.3)
    assert out8.dtype == torch.bfloat16 and out8.shape == (2, 40, 3, 16)  # FP8 in, bf16 out, as FA3
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q8[0], k8[0], v8[0], q8[1], k8[1], v8[1])]
        fake_out, fake_lse = fa3_attention(*fake, 0.3)
    assert fake_out.shape == out8.shape and fake_out.dtype == torch.bfloat16
    assert fake_lse.shape == (2, 3, 40) and fake_lse.dtype == torch.float32


def test_the_fp8_path_compiles_whole_and_matches_eager():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 96, 2, 32, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: fa3_forward(q, k, v, fp8=True)[0], fullgraph=True)
    out = compiled(q, k, v)
    eager = fa3_forward(q, k, v, fp8=True)[0]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # The same math; Inductor may round a value at an FP8 step boundary the other way.
    assert ((out.float() - eager.float()).norm() / eager.float().norm()) < 0.02


@pytest.mark.parametrize("fp8", [False, True])
def test_fa3_backend_in_the_compiled_dit_block(model, fp8):
    """The dispatcher runs our FA3 functions (here the op's CPU reference) in the model's attention,
    and the compiled per-frame block keeps the op whole (fullgraph) with the same result as eager."""
    x, tau, text = _inputs(model)
    torch._dynamo.reset()
    try:
        select_attention_backend(model, "native")
        with torch.no_grad():
            exact = forward_per_frame(model, x, tau, text)
        name = enable_fa3(model, fp8=fp8)
        assert name == (FA3_FP8_BACKEND if fp8 else FA3_BACKEND)
        want = (FA3_FP8_BACKEND if fp8 else FA3_BACKEND, FA3_BACKEND)  # cross-attention on FA3 bf16
        assert {(a.value, c.value) for a, c in _backends(model)} == {want}
        calls = []
        original = attention_dispatch._AttentionBackendRegistry._backends[attention.backend_name(want[0])]

        def spy(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        attention_dispatch._AttentionBackendRegistry._backends[attention.backend_name(want[0])] = spy
        with torch.no_grad():
            eager = forward_per_frame(model, x, tau, text, block_forward)
        attention_dispatch._AttentionBackendRegistry._backends[attention.backend_name(want[0])] = original
        # every block's self-attention went through it, and with bf16 its cross-attention too
        assert len(calls) == model.config.num_layers * (1 if fp8 else 2)
        with torch.no_grad():
            compiled = forward_per_frame(model, x, tau, text, compile_block_forward())
        assert compiled.shape == exact.shape
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        if fp8:
            assert 1e-4 < rel(eager, exact) < 0.05  # quantized: close, not equal
            assert rel(compiled, eager) < 0.02
        else:
            torch.testing.assert_close(eager, exact, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(compiled, exact, atol=1e-4, rtol=1e-4)
    finally:
        select_attention_backend(model, "native")
        torch._dynamo.reset()
    assert _backends(model) == {("native", "native")}


# ----------------------------------------------------------------------------------------------------
# Sequence parallelism: diffusers' Ulysses path runs the FA3 functions too


def _ulysses_ranks(rank: int, world: int, init_file: str) -> None:
    from test_parallel import _init, _inputs
    from test_parallel import _model as parallel_model

    from pusa_model.parallel import SequenceParallel, init_parallel_groups

    _init(rank, world, init_file)
    model = parallel_model()
    with torch.no_grad():
        groups = init_parallel_groups(cfg=1, ulysses=2, device_type="cpu")
        for fp8 in (False, True):
            for height, width in [(6, 10), (8, 8)]:  # uneven (15 tokens a frame) and even (16) shares
                x, tau, prompt, _ = _inputs(height, width)
                select_attention_backend(model, "native")
                exact = forward_per_frame(model, x, tau, prompt)
                enable_fa3(model, fp8=fp8)
                single = forward_per_frame(model, x, tau, prompt)
                parallel = SequenceParallel(model, groups)(x, tau, prompt)
                if fp8:  # per-head scales over a rank's heads and all tokens: the single process's own
                    assert ((parallel - single).norm() / single.norm()) < 0.02
                    assert 1e-4 < ((parallel - exact).norm() / exact.norm()) < 0.05  # quantized: FP8 ran
                else:
                    torch.testing.assert_close(parallel, exact, rtol=1e-5, atol=1e-5)
    torch.distributed.destroy_process_group()


def test_ulysses_runs_the_fa3_backends_on_two_ranks(tmp_path):
    from test_parallel import _spawn

    _spawn(_ulysses_ranks, 2, tmp_path)
