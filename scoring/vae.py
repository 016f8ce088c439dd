"""Wan latents -> uint8 RGB frames with diffusers' ``AutoencoderKLWan``, as ``WanPipeline`` decodes.

The store holds latents as the pipeline's sampler holds them: normalised per channel. Before
``vae.decode`` the pipeline undoes that with the VAE config's statistics,
``z = latents / (1 / latents_std) + latents_mean``, written the same way here so the float ops are
the same; ``decode`` clamps to [-1, 1] and ``VideoProcessor.postprocess_video`` maps to [0, 1].
Frames become uint8 as ``diffusers.utils.export_to_video`` makes them, ``(x * 255).astype(uint8)``
(truncation), so the frames scored here are those the reference wrote to its mp4 files, before
the codec.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from scoring.loading import load_pretrained


class WanVaeDecoder:
    """``AutoencoderKLWan`` from a local folder (a VAE folder, or a Wan checkpoint root holding ``vae/``).

    ``batch_size`` samples are decoded per ``vae.decode`` call; ``tiling`` turns on diffusers'
    tiled decoding to bound memory at full resolution (results then differ slightly at tile seams).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 1,
        tiling: bool = False,
    ):
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        root = os.fspath(model_dir)
        folder = os.path.join(root, "vae") if os.path.isdir(os.path.join(root, "vae")) else root
        self.batch_size = batch_size
        self.vae, self.device, self.dtype = load_pretrained(AutoencoderKLWan, folder, "Wan VAE", device, dtype,
                                                                 expect=("AutoencoderKLWan",))
        if tiling:
            self.vae.enable_tiling()
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)
        z_dim = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1)

    def num_frames(self, latent_frames: int) -> int:
        """Decoded frames for ``latent_frames`` latent frames (21 -> 81 for Wan)."""
        return (latent_frames - 1) * self.vae.config.scale_factor_temporal + 1

    @torch.inference_mode()
    def decode(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        """(C, F, H, W) or (B, C, F, H, W) normalised latents -> (T, H', W', 3) or (B, T, H', W', 3) uint8."""
        latents = torch.as_tensor(np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents)
        single = latents.ndim == 4
        if single:
            latents = latents[None]
        z_dim = self.vae.config.z_dim
        if latents.ndim != 5 or latents.shape[1] != z_dim:
            raise ValueError(
                f"latents must be (C, F, H, W) or (B, C, F, H, W) with C = {z_dim} (the VAE's z_dim), "
                f"got shape {tuple(latents.shape)}"
            )
        videos = []
        for batch in latents.split(self.batch_size):
            batch = batch.to(self.device, self.dtype)
            mean = self.latents_mean.to(batch.device, batch.dtype)
            # WanPipeline's order of operations: the reciprocal in the latents' dtype, then divide by it
            inv_std = 1.0 / self.latents_std.to(batch.device, batch.dtype)
            video = self.vae.decode(batch / inv_std + mean, return_dict=False)[0]
            frames = self.video_processor.postprocess_video(video, output_type="pt")  # (b, T, 3, H, W) in [0, 1]
            # To uint8 on the device so that only a quarter of float32's bytes cross to the host. The
            # "np" output would be frames.float() on the host, and float32 products are correctly
            # rounded on any device, so truncating here gives export_to_video's bytes.
            frames = (frames.float() * 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
            videos.append(frames.cpu().numpy())
        out = np.concatenate(videos)
        return out[0] if single else out
