"""Switching the fused LoRA combination of Wan2.1-T2V-14B (random weights, real sizes), timed.

Two LoRAs as the fast mode stacks them: ``pusa`` (rank `--pusa-rank`, PEFT form, every Linear of the 40
blocks) and ``distill`` (rank `--distill-rank`, LightX2V's ComfyUI form: ``lora_down``/``lora_up`` with
``alpha``, ``diff_b`` for every bias, ``diff`` for the norms and the modulation tables), converted by
`pusa_model.lora.convert_lora_state_dict` and fused by `LoraStack`:

1. base weights and both LoRAs resident on the GPU (``lora_base: device``): first fuse of A = pusa alone,
   then A -> B (pusa + distill) -> A -> B ..., each switch timed (synchronised), and the weights after
   A -> B -> A compared bit for bit with those after the first A (a copy on the host);
2. ``--cpu-base``: the same switches with the base weights in host memory (``lora_base: cpu``).

Every parameter either combination touches is written from W0 on each switch (``W0 + Σ alpha·ΔW``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dit_forward import build_transformer, environment  # noqa: E402  (bench/ is on sys.path as a script)
from pusa_model.lora import LoraStack, convert_lora_state_dict  # noqa: E402
from pusa_model.quantize import block_linears  # noqa: E402

GIB = 2**30
ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
FFN = {"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def wan_name(name: str) -> str:
    """``blocks.3.attn1.to_out.0`` -> ``blocks.3.self_attn.o``; ``blocks.3.ffn.net.0.proj`` -> ``blocks.3.ffn.0``."""
    _, block, rest = name.split(".", 2)
    if rest in FFN:
        return f"blocks.{block}.{FFN[rest]}"
    attn, proj = rest.split(".", 1)
    return f"blocks.{block}.{ATTN[attn]}.{PROJ[proj]}"


def pusa_lora(model, rank: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    out = {}
    for name, linear in block_linears(model).items():
        out[f"{name}.lora_A.weight"] = (torch.randn(rank, linear.in_features, generator=gen, device=device)
                                        / linear.in_features**0.5).to(torch.bfloat16)
        out[f"{name}.lora_B.weight"] = (torch.randn(linear.out_features, rank, generator=gen, device=device)
                                        * 0.02).to(torch.bfloat16)
    return out


def distill_lora(model, rank: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """LightX2V's key form, in bf16 as its files are."""
    def randn(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(torch.bfloat16)

    out = {}
    for name, linear in block_linears(model).items():
        key = f"diffusion_model.{wan_name(name)}"
        out[f"{key}.lora_down.weight"] = randn(rank, linear.in_features, scale=linear.in_features**-0.5)
        out[f"{key}.lora_up.weight"] = randn(linear.out_features, rank, scale=0.02)
        out[f"{key}.alpha"] = torch.tensor(float(rank))
        out[f"{key}.diff_b"] = randn(linear.out_features, scale=0.01)
    for i, block in enumerate(model.blocks):
        dim = block.norm2.weight.shape[0]
        for norm in ("norm3", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k"):
            out[f"diffusion_model.blocks.{i}.{norm}.diff"] = randn(dim, scale=0.01)
        out[f"diffusion_model.blocks.{i}.norm3.diff_b"] = randn(dim, scale=0.01)
        out[f"diffusion_model.blocks.{i}.modulation.diff"] = randn(*block.scale_shift_table.shape, scale=0.01)
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def switches(stack: LoraStack, a: dict, b: dict, count: int, device) -> dict:
    times = {"first_a_s": None, "a_to_b_s": [], "b_to_a_s": []}
    sync(device)
    t0 = time.perf_counter()
    stack.fuse(a, force=True)
    sync(device)
    times["first_a_s"] = time.perf_counter() - t0
    for i in range(count):
        for target, label in ((b, "a_to_b_s"), (a, "b_to_a_s")):
            t0 = time.perf_counter()
            stack.fuse(target)
            sync(device)
            times[label].append(time.perf_counter() - t0)
    times["median_switch_s"] = statistics.median(times["a_to_b_s"] + times["b_to_a_s"])
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pusa-rank", type=int, default=512)
    parser.add_argument("--distill-rank", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="default: the 14B model's 40")
    parser.add_argument("--switches", type=int, default=3)
    parser.add_argument("--cpu-base", action="store_true", help="also time base weights in host memory")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on the CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_transformer(args.tiny, args.layers, device, dtype, seed=0)
    gen = torch.Generator(device).manual_seed(7)
    t0 = time.perf_counter()
    loras = {"pusa": pusa_lora(model, args.pusa_rank, gen, device),
             "distill": convert_lora_state_dict(distill_lora(model, args.distill_rank, gen, device))}
    convert_s = time.perf_counter() - t0
    report = {**environment(device), "layers": model.config.num_layers, "pusa_rank": args.pusa_rank,
              "distill_rank": args.distill_rank, "convert_s": convert_s,
              "lora_gib": {n: sum(t.numel() * t.element_size() for t in s.values()) / GIB for n, s in loras.items()},
              "results": {}}
    a, b = {"pusa": 1.4}, {"pusa": 1.4, "distill": 1.0}

    def save() -> None:
        print(json.dumps(report, indent=1, default=str), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stack = LoraStack(model, loras, base_device=device, lora_device=device)
    report["targets"] = len(stack._targets)
    result = switches(stack, a, b, args.switches, device)
    at_a = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    stack.fuse(b)
    stack.fuse(a)
    result["a_b_a_bit_identical"] = all(torch.equal(p.detach().cpu(), at_a[n]) for n, p in model.named_parameters())
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    report["results"]["base_on_device"] = result
    save()
    stack.fuse({})  # W0 again, exactly: the host copy of the base weights is taken from it
    names = list(stack._targets)
    del stack, at_a
    if args.cpu_base:
        pin = device.type == "cuda"
        base = {n: model.get_parameter(n).detach().cpu() for n in names}
        base = {n: w.pin_memory() for n, w in base.items()} if pin else base
        stack = LoraStack(model, loras, base_weights=base, lora_device=device)
        report["results"]["base_in_pinned_host_memory"] = switches(stack, a, b, args.switches, device)
        save()


if __name__ == "__main__":
    main()
