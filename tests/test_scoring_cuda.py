"""The scoring models on a CUDA device against the same models on the CPU, and ``python -m scoring``
end to end on CUDA in float32 and with ``--half``. Skipped without a GPU (CI has none);
``bash benchmarks/gpu_check.sh`` runs it on one.

Tolerances: cuDNN convolutions may run in TF32 (PyTorch's default for cuDNN), so GPU float32 is
not bit-equal to the CPU. Decoded uint8 frames may differ by a few levels where a value sits near a
rounding edge; Grounding DINO boxes agree to 0.5 px on a 140 px frame and scores to 5e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scoring.loading import half_dtype
from tests import tiny_scoring_models as tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_vae_decode_on_cuda_matches_cpu(tmp_path):
    from scoring.vae import WanVaeDecoder

    vae_dir = tiny.wan_vae(tmp_path / "vae")
    latents = torch.randn(2, 4, 3, 8, 10, generator=torch.Generator().manual_seed(0)).numpy()
    cpu = WanVaeDecoder(vae_dir, device="cpu").decode(latents).astype(np.int16)
    gpu = WanVaeDecoder(vae_dir, device="cuda", batch_size=2).decode(latents).astype(np.int16)
    diff = np.abs(cpu - gpu)
    print(f"VAE cuda fp32 vs cpu: max {diff.max()} levels, mean {diff.mean():.4f}, "
          f"{(diff > 1).mean():.2%} of values off by more than 1")
    assert gpu.shape == cpu.shape == (2, 9, 64, 80, 3)
    assert diff.max() <= 8 and diff.mean() < 0.1 and (diff > 1).mean() < 0.01

    half = WanVaeDecoder(vae_dir, device="cuda", dtype=half_dtype()).decode(latents).astype(np.int16)
    half_diff = np.abs(cpu - half)
    print(f"VAE cuda {half_dtype()} vs cpu fp32: max {half_diff.max()} levels, mean {half_diff.mean():.3f}")
    assert half_diff.mean() < 4  # bf16 keeps ~3 significant digits: a coarse check that it decodes the same video


def test_grounding_dino_on_cuda_matches_cpu(tmp_path):
    from scoring.detect import GroundingDinoDetector

    gdino_dir = tiny.grounding_dino(tmp_path / "gdino")
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 100, 140, 3), dtype=np.uint8)
    kwargs = dict(box_threshold=0.05, text_threshold=0.05, batch_size=2)
    cpu = GroundingDinoDetector(gdino_dir, device="cpu", **kwargs).detect(frames, "dog", "teddy bear")
    gpu = GroundingDinoDetector(gdino_dir, device="cuda", **kwargs).detect(frames, "dog", "teddy bear")
    box_err = score_err = 0.0
    matched = 0
    for a_side, b_side in ((cpu, gpu), (gpu, cpu)):  # each side's detections must be on the other
        for want, got in zip(a_side, b_side, strict=True):
            # A detection whose score sits within the tolerance of a threshold may appear on one side only.
            for det in (d for d in want if d.score > 0.06):
                match = min((g for g in got if g.label == det.label),
                            key=lambda g: np.abs(g.box - det.box).max(), default=None)
                assert match is not None, f"{det} found on one device only"
                box_err = max(box_err, float(np.abs(match.box - det.box).max()))
                score_err = max(score_err, abs(match.score - det.score))
                matched += 1
    print(f"Grounding DINO cuda vs cpu: {matched} detections matched, boxes within {box_err:.2e} px, "
          f"scores within {score_err:.2e}")
    assert matched > 0, "the thresholds must let some boxes through for this test to mean anything"
    assert box_err < 0.5 and score_err < 5e-3


def test_sam2_tracker_on_cuda_runs_every_frame(tmp_path):
    """Random weights make masks that sit on their 0 threshold, so boxes are not compared with the
    CPU; every frame gets a box or NaN of the right shape, on the GPU, in float32 and in --half's dtype."""
    from scoring.track import TransformersSam2Tracker

    sam2_dir = tiny.sam2_video(tmp_path / "sam2")
    frames = np.random.default_rng(1).integers(0, 256, size=(6, 96, 120, 3), dtype=np.uint8)
    seeds = {"animal": np.array([10.0, 12.0, 50.0, 60.0]), "object": np.array([60.0, 20.0, 110.0, 90.0])}
    for dtype in (torch.float32, half_dtype()):
        boxes = TransformersSam2Tracker(sam2_dir, device="cuda", dtype=dtype).track(frames, 2, seeds)
        for name in seeds:
            assert boxes[name].shape == (6, 4) and boxes[name].dtype == np.float32
            assert (np.isfinite(boxes[name]).all(axis=1) | np.isnan(boxes[name]).all(axis=1)).all()


CSV = """type,prompt_id,scene,initial_SR,final_SR,animal,object,prompt
LR,p_LR,In a park,on the left of,to the right of,cat,chair,"In a park, a cat is on the left of a chair, then the cat runs to the right of the chair."
TL,p_TL,In a room,on the top of,to the left of,dog,box,"In a room, a dog is on the top of a box, then the dog jumps to the left of the box."
"""


@pytest.mark.parametrize("half", [False, True], ids=["float32", "half"])
def test_cli_end_to_end_on_cuda(tmp_path, capsys, half):
    """encode-prompts -> score -> evaluate with every model on the GPU (``--half``: bfloat16)."""
    from scoring.__main__ import main
    from spatialalign_jax.common.store import Status, Store

    models = {name: make(tmp_path / name) for name, make in (
        ("umt5", tiny.umt5), ("vae", tiny.wan_vae), ("gdino", tiny.grounding_dino), ("sam2", tiny.sam2_video),
        ("dinov2", tiny.dinov2), ("clip", tiny.clip))}
    csv = tmp_path / "prompts.csv"
    csv.write_text(CSV)
    store = tmp_path / "store"
    cuda = ["--device", "cuda", "--no-progress", *(["--half"] if half else [])]
    assert main(["encode-prompts", "--store", str(store), "--text-encoder", str(models["umt5"]), "--csv", str(csv),
                 "--latent-shape", "4,6,8,8", "--num-frames", "21", "--samples-per-prompt", "1",
                 "--max-text-len", "32", *cuda]) == 0
    st = Store.open(store, mode="r+")
    assert np.isfinite(st.read_text_embedding(0)).all()
    rng = np.random.default_rng(0)
    for p in range(2):
        st.write_latents(p, 0, rng.standard_normal((4, 6, 8, 8)).astype(np.float32), seed=p)
    assert main(["score", "--store", str(store), "--vae", str(models["vae"]), "--detector", str(models["gdino"]),
                 "--tracker", str(models["sam2"]), "--mp4-dir", str(tmp_path / "mp4"), *cuda]) == 0
    assert "scored 2 videos" in capsys.readouterr().out
    status = Store.open(store).read_status()
    assert not any(Status(int(s)).is_failure or Status(int(s)) == Status.UNSCORED for s in status.ravel())
    out = tmp_path / "report"
    assert main(["evaluate", "--store", str(store), "--out", str(out), "--dinov2", str(models["dinov2"]),
                 "--clip", str(models["clip"]), "--mp4-dir", str(tmp_path / "mp4"), *cuda]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dsr"]["num_samples"] == 2 and report["quality"]["errors"] == 0
