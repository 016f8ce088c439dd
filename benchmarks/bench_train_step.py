"""One DPO step (winner + loser, LoRA-on + reference forwards, backward, AdamW): JAX vs the PyTorch
reference step (`reference_torch.TorchDpoStep`), mid-size config, one pair, this machine's CPU, in fp32
and in the training precision (bf16 weights and activations, fp32 LoRA, fp32 loss).

    python -m benchmarks.bench_train_step [--repeats 5] [--rounds 2] [--sizes 320,1280] [--dtypes float32,bfloat16]
    python -m benchmarks.bench_train_step --full-1.3b [--remat attention_kernel,full]   # on a GPU: 1.3B at 480x832x81, bf16, 1 pair

Each framework, size and precision runs in its own process, torch and JAX alternating, `--rounds`
times; a row is the best round's median step time (the same rule for both frameworks, so a slow spell
of a shared machine does not decide the ratio). In bf16 both sides keep diffusers' fp32 modules (time
embedder, norms, modulation tables) and fp32 adapter weights. Peak memory: for PyTorch the max-RSS
growth once the model and batch exist; for JAX the buffers XLA plans for the compiled step
(temporaries + outputs). The mid-size model's 4 blocks run unrolled (`scan_unroll`), the 1.3B model's
under a scan. The FLOP count (`benchmarks.common.lora_step_flops`) is the matmul work of the plain
step: policy and reference forwards over winner and loser, and the policy's backward for activation
gradients only. Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import (FULL_FHW, FULL_TEXT_LEN, MID, SIZES, TEXT_LEN, WAN_1_3B, lora_step_flops,
                               fastest_of_rounds, peak_rss_mib, timed, write_results)

PAIRS = 1


def _host_batch(cfg: dict, fhw, text_len: int = TEXT_LEN):
    import numpy as np

    rng = np.random.default_rng(0)
    lat = lambda: rng.standard_normal((PAIRS, cfg["in_channels"], *fhw)).astype(np.float32)  # noqa: E731
    return dict(x0_w=lat(), x0_l=lat(), eps_w=lat(), eps_l=lat(),
                text_emb=rng.standard_normal((PAIRS, text_len, cfg["text_dim"])).astype(np.float32),
                sigma=np.full((PAIRS,), 0.5, np.float32))


def one_jax(size: str, repeats: int, cfg: dict = MID, dtype: str = "float32", remat: str = "none",
            attention: str = "auto", fhw=None, scan_unroll: int | bool = True, text_len: int = TEXT_LEN) -> dict:
    import jax
    from flax import nnx

    from spatialalign_jax.model.config import LoraConfig, WanConfig
    from spatialalign_jax.model.lora import BASE
    from spatialalign_jax.model.transformer import WanTransformer3DModel
    from spatialalign_jax.train.step import StepConfig, init_train_state, make_optimizer, make_train_step

    fhw = fhw or SIZES[size]
    model = WanTransformer3DModel(WanConfig.from_diffusers(cfg), lora=LoraConfig(), dtype=dtype, param_dtype=dtype,
                                  attention=attention, remat=remat, scan_unroll=scan_unroll, rngs=nnx.Rngs(0))
    step_cfg = StepConfig(warmup_steps=0)
    optimizer = make_optimizer(step_cfg)
    step = make_train_step(model, step_cfg, optimizer)
    base = nnx.state(model, BASE)
    hb = _host_batch(cfg, fhw, text_len)
    batch = {"latents_w": hb["x0_w"][None], "latents_l": hb["x0_l"][None], "text_emb": hb["text_emb"][None]}
    state = init_train_state(model, optimizer)
    key = jax.random.key(0)
    compiled = step.lower(state, base, batch, key).compile()
    mem = compiled.memory_analysis()
    box = {"state": state}

    def run():
        box["state"], metrics = step(box["state"], base, batch, key)
        jax.block_until_ready(metrics)

    sec = timed(run, repeats)
    flops = lora_step_flops(cfg, PAIRS, fhw, text_len)
    device = jax.devices()[0]
    # On accelerators the allocator's high-water mark is the real peak (weights, state, batch, step).
    used = (device.memory_stats() or {}).get("peak_bytes_in_use") if device.platform != "cpu" else None
    return {"framework": f"jax-{attention}", "size": size, "dtype": dtype, "seconds": sec,
            "gflops": flops / sec / 1e9, "tflop_per_step": flops / 1e12,
            "peak_mib": (used if used else mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20,
            "compiled_temp_mib": mem.temp_size_in_bytes / 2**20, "device": device.device_kind}


def one_torch(size: str, repeats: int, dtype: str = "float32") -> dict:
    import torch

    from benchmarks.common import torch_wan
    from reference_torch.dpo_step import TorchDpoStep

    ref = TorchDpoStep(torch_wan(MID, dtype), lora_rank=16, lora_alpha=16.0, warmup_steps=0)
    batch = {k: torch.from_numpy(v) for k, v in _host_batch(MID, SIZES[size]).items()}
    base = peak_rss_mib()
    sec = timed(lambda: ref.step(batch), repeats)
    with torch.no_grad():
        t = torch.full((2,), 500.0)
        x = torch.cat([batch["x0_w"], batch["x0_l"]]).to(ref.transformer.dtype)
        text = torch.cat([batch["text_emb"]] * 2).to(ref.transformer.dtype)
        fwd = timed(lambda: ref.transformer(x, t, text), repeats)
    flops = lora_step_flops(MID, PAIRS, SIZES[size], TEXT_LEN)
    return {"framework": "pytorch-reference", "size": size, "dtype": dtype, "seconds": sec,
            "gflops": flops / sec / 1e9, "peak_mib": peak_rss_mib() - base, "forwards_per_step": sec / fwd}


def full_1_3b(repeats: int, remat: str = "attention_kernel", attention: str = "cudnn") -> dict:
    """Wan2.1-T2V-1.3B, 480x832x81 (32,760 tokens), 512 text rows (SPEC section 6), bf16 with fp32 LoRA,
    remat, cuDNN attention, one pair."""
    r = one_jax("1.3b-480x832x81", repeats, cfg=WAN_1_3B, dtype="bfloat16", remat=remat, attention=attention,
                fhw=FULL_FHW, scan_unroll=1, text_len=FULL_TEXT_LEN)
    r["remat"] = remat
    # Dense bf16 tensor-core peaks (datasheets) of the SXM parts, by JAX's device_kind; PCIe and NVL
    # parts run lower clocks, so no MFU is claimed for a card not listed.
    peak = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0}.get(r["device"])
    r["mfu"] = r["gflops"] / 1e3 / peak if peak else None
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sizes", default="320,1280")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--full-1.3b", dest="full", action="store_true")
    p.add_argument("--remat", default="attention_kernel",
                   help="with --full-1.3b: remat policies to run, comma-separated (see model.REMAT_POLICIES)")
    p.add_argument("--attention", default="cudnn", help="with --full-1.3b: the attention implementation")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        kind, size, dtype = args._one.split(":")
        r = (one_torch(size, args.repeats, dtype) if kind == "torch"
             else full_1_3b(args.repeats, remat=size, attention=args.attention) if kind == "full" else one_jax(size, args.repeats, dtype=dtype))
        print(json.dumps(r))
        return
    if args.full:
        cells, kinds = [(remat, "bfloat16") for remat in args.remat.split(",")], ["full"]
    else:
        cells = [(s, d) for s in args.sizes.split(",") for d in args.dtypes.split(",")]
        kinds = ["torch", "jax"]
    rows = fastest_of_rounds("benchmarks.bench_train_step",
                             [["--_one", f"{kind}:{size}:{dtype}", "--repeats", str(args.repeats), "--attention",
                               args.attention] for size, dtype in cells for kind in kinds],
                             1 if args.full else args.rounds)
    print(f"{'framework':<20}{'tokens':>8}{'dtype':>10}{'ms/step':>10}{'GFLOP/s':>10}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['framework']:<20}{r['size']:>8}{r['dtype']:>10}{1e3 * r['seconds']:>10.1f}{r['gflops']:>10.1f}"
              f"{r['peak_mib']:>10.0f}")
    by = {(r["framework"].split("-")[0], r["size"], r["dtype"]): r["seconds"] for r in rows}
    for size, dtype in cells:
        if ("pytorch", size, dtype) in by and ("jax", size, dtype) in by:
            print(f"{size} tokens, {dtype}: JAX is {by[('pytorch', size, dtype)] / by[('jax', size, dtype)]:.2f}x "
                  "the speed of the PyTorch step")
    path = write_results("train_step_full_1.3b" if args.full else "train_step",
                         {"config": WAN_1_3B if args.full else MID, "pairs": PAIRS,
                          "text_len": FULL_TEXT_LEN if args.full else TEXT_LEN,
                          "rounds": 1 if args.full else args.rounds, "repeats": args.repeats, "rows": rows})
    for r in rows:
        if r.get("mfu") is not None:
            print(f"{r['framework']} {r['size']} remat={r['remat']}: {r['seconds']:.2f} s/step, "
                  f"{r['tflop_per_step']:.0f} TFLOP/step, model FLOPs utilisation {100 * r['mfu']:.1f}% of the "
                  f"card's dense bf16 peak, peak memory {r['peak_mib'] / 1024:.1f} GiB")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
