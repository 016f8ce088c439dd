"""Wan VAE decoding against WanPipeline's own decode path (tiny random VAE and DiT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scoring.vae import WanVaeDecoder
from tests import tiny_scoring_models as tiny


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return tiny.wan_vae(tmp_path_factory.mktemp("vae"))


def run_pipeline(vae_dir, seed: int):
    """WanPipeline with a one-block DiT, 2 steps: its final latents and its decoded 'np' frames."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer,
        vae=AutoencoderKLWan.from_pretrained(vae_dir).eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    captured = {}

    def keep_latents(pipe, i, t, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        return {}

    frames = pipe(
        prompt_embeds=torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(seed)), guidance_scale=1.0,
        height=32, width=48, num_frames=9, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep_latents,
    ).frames
    return captured["latents"], frames


def test_matches_wan_pipeline_decode(vae_dir):
    """Same uint8 frames as the pipeline's float frames converted as export_to_video does.

    The ops are identical fp32 CPU ops, so the bytes are equal.
    """
    latents, pipe_frames = run_pipeline(vae_dir, seed=3)
    expected = (pipe_frames * 255).astype(np.uint8)
    got = WanVaeDecoder(vae_dir, device="cpu").decode(latents.numpy())
    assert got.dtype == np.uint8 and got.shape == expected.shape == (1, 9, 32, 48, 3)
    np.testing.assert_array_equal(got, expected)
    assert got.std() > 0  # the random VAE does not decode to a constant


def test_single_sample_batching_and_errors(vae_dir, tmp_path):
    latents = torch.randn(3, 4, 2, 2, 3, generator=torch.Generator().manual_seed(0)).numpy()
    decoder = WanVaeDecoder(vae_dir, device="cpu", batch_size=2)
    assert decoder.num_frames(21) == 81
    batched = decoder.decode(latents)
    assert batched.shape == (3, decoder.num_frames(2), 16, 24, 3)
    single = decoder.decode(latents[2])  # alone vs. in the last, one-sample batch
    assert single.shape == batched.shape[1:]
    assert_close_uint8(single, batched[2])
    with pytest.raises(ValueError, match="z_dim"):
        decoder.decode(latents[:, :3])
    with pytest.raises(FileNotFoundError, match="no_vae_here"):
        WanVaeDecoder(tmp_path / "no_vae_here", device="cpu")
    # A Wan checkpoint root with the VAE in vae/ loads too.
    root = tmp_path / "wan"
    tiny.wan_vae(root / "vae")
    assert_close_uint8(WanVaeDecoder(root, device="cpu").decode(latents[0]), batched[0])


def assert_close_uint8(a: np.ndarray, b: np.ndarray) -> None:
    """At most one 1/255 step apart (float noise across batch shapes), on < 1% of the values."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
