"""A LoRA on a quantized DiT (random weights, real sizes): fuse first, then quantize, checked and timed.

For each mode (``fp8``, ``int8``) on Wan2.1-T2V-14B with a random LoRA on every Linear of the blocks:

1. quantize the bf16 model (`quantize_blocks`), run the compiled per-frame forward once (compiles);
2. ``LoraFuser.fuse(alpha)``, which re-quantizes each weight as it writes it: timed (the switch cost),
   then a forward, counting dynamo compiles (a switch must not recompile);
3. the reference order on the same model: bf16 weights back, fuse at alpha, quantize; its quantized
   weights must equal step 2's bit for bit, and its output too;
4. ``fuse(0)`` must give back the quantized base weights bit for bit.

``--tiny`` runs it on the CPU with the tiny preset (``int8`` only; FP8 needs sm89+).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from dit_forward import build_transformer, dit_inputs, environment  # noqa: E402  (bench/ is on sys.path as a script)
from pusa_model.lora import LoraFuser  # noqa: E402
from pusa_model.quantize import block_linears, quantize_blocks  # noqa: E402
from pusa_model.transformer import compile_block_forward, forward_per_frame, select_attention_backend  # noqa: E402


def random_lora(model, rank: int, seed: int, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, linear in block_linears(model).items():
        a = torch.randn(rank, linear.in_features, generator=gen, device=device) / linear.in_features**0.5
        b = torch.randn(linear.out_features, rank, generator=gen, device=device) * 0.02
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a.to(torch.bfloat16), b.to(torch.bfloat16)
    return state


def qweights(model) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, linear in block_linears(model).items():
        inner, _ = linear.weight.__tensor_flatten__()
        out[name] = [getattr(linear.weight, t).clone() for t in inner if getattr(linear.weight, t) is not None]
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a
    )


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(model, base: dict, mode: str, lora: dict, alpha: float, inputs, device) -> dict:
    x, text, tau = inputs
    block_fn = compile_block_forward()
    applied = quantize_blocks(model, mode)
    if applied != mode:
        return {"skipped": f"{mode} fell back (see the warning)"}
    q_base = qweights(model)
    fuser = LoraFuser(model, lora, base_weights=base)
    with torch.no_grad():
        forward_per_frame(model, x, tau, text, block_fn)  # compiles
        sync(device)
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        fuser.fuse(alpha)
        sync(device)
        switch_s = time.perf_counter() - t0
        fused = forward_per_frame(model, x, tau, text, block_fn)
        sync(device)
        recompiles = counters["stats"]["unique_graphs"] - graphs
        q_fused = qweights(model)
        t0 = time.perf_counter()
        fuser.fuse(0.0)
        sync(device)
        back_s = time.perf_counter() - t0
        back_to_base = same(qweights(model), q_base)

        # The reference order: bf16 weights back, fuse at alpha, quantize.
        for name, linear in block_linears(model).items():
            linear.weight = torch.nn.Parameter(base[f"{name}.weight"].to(device), requires_grad=False)
        LoraFuser(model, lora, base_weights=base).fuse(alpha)
        quantize_blocks(model, mode)
        reference = forward_per_frame(model, x, tau, text, block_fn)
        equal_weights = same(q_fused, qweights(model))
        equal_output = torch.equal(fused, reference)
        for name, linear in block_linears(model).items():  # bf16 base weights for the next mode
            linear.weight = torch.nn.Parameter(base[f"{name}.weight"].to(device), requires_grad=False)
    return {
        "switch_s": switch_s, "back_to_base_s": back_s, "recompiles_after_switch": recompiles,
        "fuse_then_quantize_equal_weights": equal_weights, "equal_output": equal_output,
        "fuse_0_restores_quantized_base": back_to_base,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="fp8,int8")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=1.4)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_transformer(args.tiny, args.layers, device, dtype, seed=0)
    select_attention_backend(model, "auto")
    base = {f"{name}.weight": linear.weight.detach().to("cpu") for name, linear in block_linears(model).items()}
    lora = random_lora(model, args.rank, seed=7, device=device)
    x, text, tau, _, _ = dit_inputs(model, "480p", args.tiny, 0, device, dtype)
    report = {**environment(device), "rank": args.rank, "alpha": args.alpha, "layers": model.config.num_layers,
              "linears": len(base), "results": {}}
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        report["results"][mode] = check(model, base, mode, lora, args.alpha, (x, text, tau), device)
        print(mode, json.dumps(report["results"][mode]), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
