"""Frames per second of VAE decoding, detection (Grounding DINO) and tracking (SAM 2) at 480 x 832.

The models have the real checkpoints' architectures with random weights (no weights are
downloaded): Grounding DINO as ``IDEA-Research/grounding-dino-tiny`` (Swin-T backbone, BERT-base
text encoder, 6 + 6 layers, 900 queries, frames resized to 800 / 1333 px) and SAM 2.1 hiera-large
(Hiera-L 144-wide [2, 6, 36, 4] blocks at 1024 px, 4 memory-attention layers). They are saved to a
temporary folder and loaded through the scorer's own ``from_pretrained`` code, then timed on one
synthetic video (two objects tracked, seeded on its first frame, as a valid video is). The Wan2.1
VAE (diffusers' ``AutoencoderKLWan`` defaults are its architecture) decodes one video's latents,
21 x 60 x 104 -> 81 frames, by default on a GPU only (on 2 CPU cores it takes tens of minutes).

    python benchmarks/bench_scoring.py [--frames 6] [--device cpu|cuda] [--half] [--vae-latent-frames N] [--out PATH]

``--half`` is the scorer's: bfloat16 where the card has it, else float16.

Prints the numbers and writes them (merged per device) to ``benchmarks/results/scoring.json``.
Random weights cost the same time as trained ones: the work per frame does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoring.detect import GroundingDinoDetector  # noqa: E402
from scoring.loading import half_dtype  # noqa: E402
from scoring.track import TransformersSam2Tracker  # noqa: E402
from scoring.vae import WanVaeDecoder  # noqa: E402
from spatialalign_jax.common.atomic import write_text_atomic  # noqa: E402

HEIGHT, WIDTH = 480, 832
RESULTS = Path(__file__).with_name("results") / "scoring.json"


def save_grounding_dino_tiny(folder: Path) -> None:
    """grounding-dino-tiny's architecture (its config.json values) with random weights."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, image_size=224,
        out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
    )
    text = BertConfig()  # bert-base-uncased: 12 layers, 768 wide, 30522 tokens
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=256, encoder_layers=6, decoder_layers=6,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, encoder_attention_heads=8, decoder_attention_heads=8,
        num_queries=900, num_feature_levels=4, encoder_n_points=4, decoder_n_points=4, two_stage=True,
        max_text_len=256,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    # The real tokenizer's vocabulary is not available offline; a small one tokenizes the benchmark's
    # two-word query to the same number of tokens, which is all the compute depends on.
    vocab = folder / "vocab_source.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "cat", "chair"]) + "\n")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}),
        tokenizer=BertTokenizer(str(vocab)),
    )
    processor.save_pretrained(folder)


def save_sam21_hiera_large(folder: Path) -> None:
    """SAM 2.1 hiera-large's architecture (facebook/sam2.1-hiera-large) with random weights."""
    from transformers import Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    backbone = Sam2HieraDetConfig(
        hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4],
        embed_dim_per_stage=[144, 288, 576, 1152], num_attention_heads_per_stage=[2, 4, 8, 16],
        window_size_per_stage=[8, 4, 16, 8], global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7],
    )
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[1152, 576, 288, 144])
    Sam2VideoModel(Sam2VideoConfig(vision_config=vision)).eval().save_pretrained(folder)
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(), video_processor=Sam2VideoVideoProcessor()).save_pretrained(folder)


def synthetic_video(num_frames: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(num_frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    return frames, {"animal": np.array([100.0, 200.0, 260.0, 380.0]), "object": np.array([420.0, 220.0, 640.0, 420.0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=6, help="frames of the timed video (default 6)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--half", action="store_true", help="bfloat16 (else float16) weights and activations (GPU)")
    parser.add_argument("--vae-latent-frames", type=int, default=None,
                        help="latent frames of the timed VAE decode (default: 21 on CUDA, 0 = skipped on the CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="Grounding DINO frames per batch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = half_dtype() if args.half and cuda else torch.float32
    vae_latent_frames = args.vae_latent_frames if args.vae_latent_frames is not None else (21 if cuda else 0)
    torch.manual_seed(0)
    frames, seeds = synthetic_video(args.frames)

    def timed(fn) -> tuple[float, float | None]:
        """Seconds of ``fn()`` and, on CUDA, the allocator's high-water mark over it in GiB."""
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    vae = {}
    if vae_latent_frames > 0:
        with tempfile.TemporaryDirectory(prefix="bench_scoring_vae_") as tmp:
            from diffusers import AutoencoderKLWan

            AutoencoderKLWan().save_pretrained(tmp)
            decoder = WanVaeDecoder(tmp, device=args.device, dtype=dtype)
            latents = torch.randn(16, vae_latent_frames, HEIGHT // 8, WIDTH // 8)
            decoder.decode(latents[:, :2])  # warm-up: cuDNN's algorithm choice, the allocator
            vae_s, vae_gib = timed(lambda: decoder.decode(latents))
            vae_frames = decoder.num_frames(vae_latent_frames)
            vae = {"vae_latent_frames": vae_latent_frames, "vae_decoded_frames": vae_frames,
                   "vae_decode_s": vae_s, "vae_decode_fps": vae_frames / vae_s, "vae_peak_gib": vae_gib}
            del decoder

    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        gdino_dir, sam_dir = Path(tmp, "gdino"), Path(tmp, "sam2")
        save_grounding_dino_tiny(gdino_dir)
        save_sam21_hiera_large(sam_dir)
        detector = GroundingDinoDetector(gdino_dir, device=args.device, dtype=dtype, batch_size=args.batch_size)
        tracker = TransformersSam2Tracker(sam_dir, device=args.device, dtype=dtype)
        params = {
            "grounding_dino_params": sum(p.numel() for p in detector.model.parameters()),
            "sam2_params": sum(p.numel() for p in tracker.model.parameters()),
        }
        # Warm-up on a short clip (allocator, kernels), then the timed run.
        detector.detect(frames[:1], "cat", "chair")
        tracker.track(frames[:2], 0, seeds)
        detect_s, detect_gib = timed(lambda: detector.detect(frames, "cat", "chair"))
        track_s, track_gib = timed(lambda: tracker.track(frames, 0, seeds))

    n = len(frames)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    result = {
        "device": device_name,
        "dtype": str(dtype).replace("torch.", ""),
        "frames": n,
        "resolution": [HEIGHT, WIDTH],
        "torch_threads": torch.get_num_threads(),
        "detection_fps": n / detect_s,
        "tracking_fps": n / track_s,
        "detection_plus_tracking_fps": n / (detect_s + track_s),
        "detection_peak_gib": detect_gib,
        "tracking_peak_gib": track_gib,
        **vae,
        # Decoding (when timed) plus detection and tracking of every frame: the scorer's work per video.
        "seconds_per_81_frame_video": 81 * (detect_s + track_s) / n + (
            vae["vae_decode_s"] * 81 / vae["vae_decoded_frames"] if vae else 0.0),
        "seconds_per_81_frame_video_includes_vae": bool(vae),
        **params,
        "torch": torch.__version__,
        # The machine may be shared: the load during the run says how much of it the timing had.
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    for key, value in result.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(args.out.read_text()) if args.out.is_file() else {}
    records[f"{args.device.split(':')[0]}-{result['dtype']}"] = result
    write_text_atomic(args.out, json.dumps(records, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
