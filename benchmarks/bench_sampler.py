"""Seconds per sample of the JAX sampler (UniPC, classifier-free guidance: prompt and negative prompt
in one batch of 2), what step 2 of the README's recipe spends per video.

    python -m benchmarks.bench_sampler [--steps 6] [--repeats 2]     # mid-size model, 320 tokens (CPU)
    python -m benchmarks.bench_sampler --full-1.3b [--steps 6]       # on a GPU: 1.3B at 480x832x81, bf16

Runs `--steps` denoising steps (compiled once, then timed), and reports the time per step and the
50-step sample it implies (the solver's own work between steps is a few latent-sized ops). The model
has random weights: the work does not depend on them. Writes benchmarks/results/sampler[_full_1.3b].json.
"""

from __future__ import annotations

import argparse

from benchmarks.common import FULL_FHW, FULL_TEXT_LEN, MID, SIZES, TEXT_LEN, WAN_1_3B, forward_flops, timed, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="denoising steps timed (default 6)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--full-1.3b", dest="full", action="store_true")
    p.add_argument("--dtype", default=None, help="default: bfloat16 with --full-1.3b, else float32")
    p.add_argument("--attention", default="auto")
    args = p.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from spatialalign_jax.model.config import WanConfig
    from spatialalign_jax.model.transformer import WanTransformer3DModel
    from spatialalign_jax.sample.sampler import DEFAULT_STEPS, denoise

    cfg, fhw, text_len = (WAN_1_3B, FULL_FHW, FULL_TEXT_LEN) if args.full else (MID, SIZES["320"], TEXT_LEN)
    dtype = args.dtype or ("bfloat16" if args.full else "float32")
    model = WanTransformer3DModel(WanConfig.from_diffusers(cfg), lora=None, dtype=dtype, param_dtype=dtype,
                                  attention=args.attention, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, cfg["in_channels"], *fhw)).astype(np.float32)
    text = rng.standard_normal((1, text_len, cfg["text_dim"])).astype(np.float32)
    neg = rng.standard_normal((text_len, cfg["text_dim"])).astype(np.float32)

    def run():
        jax.block_until_ready(denoise(model, latents, text, neg, num_steps=args.steps))

    sec = timed(run, args.repeats)
    per_step = sec / args.steps
    device = jax.devices()[0]
    flops = forward_flops(cfg, 2, fhw, text_len)  # one step: cond + uncond
    result = {
        "model": "1.3b" if args.full else "mid", "latents": list(fhw), "text_len": text_len, "dtype": dtype,
        "attention": args.attention, "steps_timed": args.steps, "seconds_per_step": per_step,
        f"seconds_per_{DEFAULT_STEPS}_step_sample": per_step * DEFAULT_STEPS,
        "tflop_per_s": flops / per_step / 1e12, "device": device.device_kind,
    }
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    for k, v in result.items():
        print(f"{k:30s} {v:.3f}" if isinstance(v, float) else f"{k:30s} {v}")
    print("written to", write_results("sampler_full_1.3b" if args.full else "sampler", result))


if __name__ == "__main__":
    main()
