"""Forward pass: jitted Flax Wan against diffusers eager, mid-size config, fp32, this machine's CPU.

    python -m benchmarks.bench_forward [--repeats 5] [--rounds 2] [--sizes 320,1280] [--attention blockwise,xla]
    python -m benchmarks.bench_forward --full-1.3b     # on a GPU: 1.3B at 480x832x81, bf16, cuDNN

Each framework and size runs in its own process, the frameworks alternating, `--rounds` times; a row
is the fastest round's median. Peak memory is the forward's own: for diffusers the
max-RSS growth over the process once the model and inputs exist; for JAX the buffers XLA plans for
the compiled forward (temporaries + output). Prints a table and writes
benchmarks/results/forward.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.common import (BATCH, FULL_FHW, FULL_TEXT_LEN, MID, SIZES, TEXT_LEN, WAN_1_3B, forward_flops,
                               fastest_of_rounds, matmul_peak_gflops, peak_rss_mib, timed, write_results)


def _inputs(cfg: dict, fhw: tuple[int, int, int], batch: int, text_len: int = TEXT_LEN):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cfg["in_channels"], *fhw)).astype(np.float32)
    t = np.array([500.0] * batch, np.float32)
    ctx = rng.standard_normal((batch, text_len, cfg["text_dim"])).astype(np.float32)
    return x, t, ctx


def one_jax(size: str, attention: str, repeats: int, cfg: dict = MID, dtype: str = "float32",
            fhw: tuple[int, int, int] | None = None, batch: int = BATCH, text_len: int = TEXT_LEN) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from spatialalign_jax.model.config import WanConfig
    from spatialalign_jax.model.transformer import WanTransformer3DModel

    fhw = fhw or SIZES[size]
    model = WanTransformer3DModel(WanConfig.from_diffusers(cfg), dtype=dtype, param_dtype=dtype,
                                  attention=attention, rngs=nnx.Rngs(0))
    x, t, ctx = (jnp.asarray(a) for a in _inputs(cfg, fhw, batch, text_len))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    compiled = fwd.lower(state, x, t, ctx).compile()
    sec = timed(lambda: fwd(state, x, t, ctx).block_until_ready(), repeats)
    # XLA plans all buffers ahead: activations (temp) plus the output are the forward's own memory.
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
    flops = forward_flops(cfg, batch, fhw, text_len)
    return {"framework": f"jax-{attention}", "size": size, "seconds": sec, "gflops": flops / sec / 1e9,
            "peak_mib": peak, "device": jax.devices()[0].device_kind}


def one_torch(size: str, repeats: int) -> dict:
    import torch

    from benchmarks.common import torch_wan

    model = torch_wan(MID).eval()
    x, t, ctx = (torch.from_numpy(a) for a in _inputs(MID, SIZES[size], BATCH))
    base = peak_rss_mib()  # before any forward: the growth is the forward's activations
    with torch.no_grad():
        sec = timed(lambda: model(x, t, ctx), repeats)
    flops = forward_flops(MID, BATCH, SIZES[size], TEXT_LEN)
    return {"framework": "diffusers-eager", "size": size, "seconds": sec, "gflops": flops / sec / 1e9,
            "peak_mib": peak_rss_mib() - base, "threads": torch.get_num_threads()}


def full_1_3b(repeats: int) -> dict:
    """Wan2.1-T2V-1.3B at 480x832, 81 frames (latents 21x60x104, 32,760 tokens), 512 text rows, bf16,
    cuDNN, batch 1."""
    return one_jax("1.3b-480x832x81", "cudnn", repeats, cfg=WAN_1_3B, dtype="bfloat16", fhw=FULL_FHW, batch=1,
                   text_len=FULL_TEXT_LEN)


def full_1_3b_torch(repeats: int) -> dict:
    """The same forward in diffusers on the GPU (bf16, PyTorch SDPA), peak from CUDA's allocator."""
    import torch

    from benchmarks.common import torch_wan

    model = torch_wan(WAN_1_3B, "bfloat16").eval().cuda()
    x, t, ctx = (torch.from_numpy(a).cuda() for a in _inputs(WAN_1_3B, FULL_FHW, 1, FULL_TEXT_LEN))
    x, ctx = x.bfloat16(), ctx.bfloat16()
    torch.cuda.reset_peak_memory_stats()

    def run():
        model(x, t, ctx)
        torch.cuda.synchronize()

    with torch.no_grad():
        sec = timed(run, repeats)
    flops = forward_flops(WAN_1_3B, 1, FULL_FHW, FULL_TEXT_LEN)
    return {"framework": "diffusers-eager", "size": "1.3b-480x832x81", "seconds": sec, "gflops": flops / sec / 1e9,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "device": torch.cuda.get_device_name()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sizes", default="320,1280")
    p.add_argument("--attention", default="blockwise,xla")
    p.add_argument("--full-1.3b", dest="full", action="store_true")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._one:  # child process: one measurement, one JSON line
        kind, size = args._one.split(":")
        r = one_torch(size, args.repeats) if kind == "torch" else (
            full_1_3b(args.repeats) if kind == "full" else
            full_1_3b_torch(args.repeats) if kind == "torchfull" else one_jax(size, kind, args.repeats))
        print(json.dumps(r))
        return

    cells = [f"{kind}:0" for kind in ("full", "torchfull")] if args.full else [
        f"{kind}:{size}" for size in args.sizes.split(",") for kind in ["torch", *args.attention.split(",")]]
    rows = fastest_of_rounds("benchmarks.bench_forward",
                             [["--_one", cell, "--repeats", str(args.repeats)] for cell in cells],
                             1 if args.full else args.rounds)
    peak = None if args.full else matmul_peak_gflops()
    if peak:
        print(f"fp32 1024x1024 matmul peak on this machine: torch {peak['torch']:.0f} GFLOP/s, "
              f"jax {peak['jax']:.0f} GFLOP/s")
    print(f"{'framework':<18}{'tokens':>8}{'ms':>10}{'GFLOP/s':>10}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['framework']:<18}{r['size']:>8}{1e3 * r['seconds']:>10.1f}{r['gflops']:>10.1f}{r['peak_mib']:>10.0f}")
    path = write_results("forward_full_1.3b" if args.full else "forward",
                         {"config": MID if not args.full else WAN_1_3B, "batch": 1 if args.full else BATCH,
                          "text_len": FULL_TEXT_LEN if args.full else TEXT_LEN,
                          "rounds": 1 if args.full else args.rounds, "matmul_peak_gflops": peak, "rows": rows,
                          "python": sys.version.split()[0]})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
