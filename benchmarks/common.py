"""Shared pieces of the benchmarks: the mid-size config, FLOP counts, peak memory, a matmul peak."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# The mid-size config of issue 2's benchmark (diffusers config names).
MID = dict(num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=256,
           freq_dim=256, ffn_dim=1536, num_layers=4, rope_max_seq_len=1024)
# Wan2.1-T2V-1.3B (SPEC section 6).
WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024)
SIZES = {"320": (5, 16, 16), "1280": (5, 32, 32)}
# The real-scale case of the GPU benchmarks: 480x832, 81 frames (latents 21x60x104, 32,760 tokens),
# the prompt zero-padded to 512 text rows as the DiT sees it (SPEC section 6).
FULL_FHW, FULL_TEXT_LEN = (21, 60, 104), 512
BATCH, TEXT_LEN = 2, 32


def forward_flops(cfg: dict, batch: int, latent_fhw: tuple[int, int, int], text_len: int,
                  part: str = "all") -> float:
    """Matmul FLOPs (2 per multiply-add) of one Wan forward; elementwise work is left out.

    `part`: "all", "attention" (the two attention products of self- and cross-attention), or
    "linear" (everything else).
    """
    f, h, w = latent_fhw
    tokens = f * (h // 2) * (w // 2)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    patch = cfg["in_channels"] * 4
    attention = 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * text_len * d
    linear = (
        4 * 2 * tokens * d * d          # self-attention q, k, v, out
        + 2 * 2 * tokens * d * d        # cross-attention q, out
        + 2 * 2 * text_len * d * d      # cross-attention k, v
        + 2 * 2 * tokens * d * cfg["ffn_dim"]
    )
    outer = (2 * tokens * patch * d + 2 * tokens * d * cfg["out_channels"] * 4
             + 2 * text_len * (cfg["text_dim"] * d + d * d) + 2 * (cfg["freq_dim"] * d + d * d + 6 * d * d))
    parts = {"attention": cfg["num_layers"] * attention, "linear": cfg["num_layers"] * linear + outer}
    return float(batch * (sum(parts.values()) if part == "all" else parts[part]))


def lora_step_flops(cfg: dict, pairs: int, latent_fhw: tuple[int, int, int], text_len: int) -> float:
    """Matmul FLOPs of one LoRA DPO step over `pairs` (winner + loser): policy and reference forwards,
    and the policy's backward, which needs activation gradients only (the base is frozen): one more
    pass of the linear layers and two of attention (dQ, dK, dV, dP). LoRA's own FLOPs are negligible.
    """
    n = 2 * pairs
    fwd = forward_flops(cfg, n, latent_fhw, text_len)
    return 2 * fwd + forward_flops(cfg, n, latent_fhw, text_len, "linear") + 2 * forward_flops(
        cfg, n, latent_fhw, text_len, "attention")


def torch_wan(cfg: dict, dtype: str = "float32", seed: int = 0):
    """A random diffusers `WanTransformer3DModel` in `dtype`, tensors of `_keep_in_fp32_modules` left
    in fp32 by the rule of diffusers' loader (a path item equal to a listed name), as
    `from_pretrained(torch_dtype=...)` leaves them."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**cfg)
    keep = model._keep_in_fp32_modules or []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not any(m in name.split(".") for m in keep):
            t.data = t.data.to(getattr(torch, dtype))
    return model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> dict[str, float]:
    """fp32 n x n matmul throughput of torch and of jitted JAX on this machine."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ta = torch.from_numpy(a)
    ja = jnp.asarray(a)
    mm = jax.jit(lambda x: x @ x)
    flops = 2.0 * n**3
    return {
        "torch": flops / timed(lambda: torch.mm(ta, ta), repeats) / 1e9,
        "jax": flops / timed(lambda: mm(ja).block_until_ready(), repeats) / 1e9,
    }


def run_isolated(module: str, args: list[str]) -> dict:
    """Runs `python -m module args` in a fresh process (its own peak memory) and returns its JSON line."""
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))})
    return json.loads(out.stdout.strip().splitlines()[-1])


def fastest_of_rounds(module: str, jobs: list[list[str]], rounds: int) -> list[dict]:
    """Runs every job (the argument list of one isolated measurement) once per round, the jobs
    alternating within a round, and keeps each job's fastest round: a slow spell of a shared machine
    then decides no comparison, and every framework is held to the same rule."""
    best: list[dict | None] = [None] * len(jobs)
    for _ in range(rounds):
        for i, job in enumerate(jobs):
            r = run_isolated(module, job)
            if best[i] is None or r["seconds"] < best[i]["seconds"]:
                best[i] = r
    return best


def write_results(name: str, results: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
