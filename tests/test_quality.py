"""ID consistency (DINOv2 on the animal's crops) and CLIP-IQA "natural" with tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scoring.quality import ClipIqa, IdConsistency, crop_box, subject_consistency
from tests import tiny_scoring_models as tiny


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return tiny.dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny.clip(tmp_path_factory.mktemp("clip"))


def test_subject_consistency_formula():
    # f0 = x, f1 = y (orthogonal to f0), f2 = x: pairs (prev, first) = (0, 0) and (0, 1).
    feats = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    assert subject_consistency(feats) == pytest.approx(((0 + 0) / 2 + (0 + 1) / 2) / 2)
    # Negative cosines are clipped to 0, as VBench does.
    assert subject_consistency(np.array([[1.0, 0.0], [-1.0, 0.0]])) == 0.0
    assert subject_consistency(np.ones((5, 3))) == pytest.approx(1.0)
    assert math.isnan(subject_consistency(np.ones((1, 3))))


def test_crop_box():
    frame = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    np.testing.assert_array_equal(crop_box(frame, np.array([2.0, 3.0, 5.0, 4.0])), frame[3:5, 2:6])
    np.testing.assert_array_equal(crop_box(frame, np.array([2.7, 3.2, 5.9, 4.5])), frame[3:5, 2:6])
    np.testing.assert_array_equal(crop_box(frame, np.array([-4.0, -1.0, 30.0, 40.0])), frame)
    assert crop_box(frame, np.array([np.nan] * 4)) is None
    assert crop_box(frame, np.array([20.0, 1.0, 30.0, 4.0])) is None  # outside the frame
    # a sliver (more than 4:1) is skipped; 4:1 itself is kept
    assert crop_box(frame, np.array([0.0, 0.0, 9.0, 1.0])) is None
    assert crop_box(frame, np.array([0.0, 0.0, 7.0, 1.0])).shape == (2, 8, 3)


def test_id_consistency_against_vbench_steps(dino_dir):
    """Features equal an independent VBench-style pipeline (torchvision Resize(224) on uint8,
    /255, ImageNet normalisation, DINOv2 CLS) to 1e-5; the score follows the formula."""
    from torchvision import transforms
    from transformers import AutoModel

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 64, 96, 3), dtype=np.uint8)
    boxes = np.array([[5, 6, 40, 50], [np.nan] * 4, [10, 8, 70, 30], [0, 0, 95, 63], [30, 20, 45, 60]], dtype=np.float32)
    metric = IdConsistency(dino_dir, device="cpu")

    model = AutoModel.from_pretrained(dino_dir).eval()
    vbench = transforms.Compose([
        transforms.Resize(size=224, antialias=False),
        transforms.Lambda(lambda x: x.float().div(255.0)),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    ref = []
    for i in (0, 2, 3, 4):
        x0, y0, x1, y1 = boxes[i].astype(int)
        crop = torch.from_numpy(frames[i, y0 : y1 + 1, x0 : x1 + 1]).permute(2, 0, 1)
        with torch.no_grad():
            ref.append(model(pixel_values=vbench(crop)[None]).pooler_output[0].numpy())
    ref = np.stack(ref)
    got = metric.features([crop_box(f, b) for f, b in zip(frames, boxes) if crop_box(f, b) is not None])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert metric.score(frames, boxes) == pytest.approx(subject_consistency(ref), abs=1e-6)


def test_id_consistency_batches_crops_of_one_shape(dino_dir):
    """Crops that resize to the same shape share forwards of at most batch_size crops; the
    features, back in the crops' order, equal one forward per crop to 1e-5."""
    rng = np.random.default_rng(3)
    # Five 20x30 crops (one resized shape) with a 30x20 and a 20x40 crop in between.
    sizes = [(20, 30), (30, 20), (20, 30), (20, 30), (20, 40), (20, 30), (20, 30)]
    crops = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
    metric = IdConsistency(dino_dir, device="cpu", batch_size=2)
    one_by_one = np.stack([metric.features([crop])[0] for crop in crops])
    batch_sizes = []
    hook = metric.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    try:
        got = metric.features(crops)
    finally:
        hook.remove()
    assert sorted(batch_sizes) == [1, 1, 1, 2, 2]  # 5 same-shape crops in chunks of 2, 2, 1
    assert got.shape == (7, metric.model.config.hidden_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, one_by_one, atol=1e-5, rtol=1e-5)
    assert metric.features([]).shape == (0, metric.model.config.hidden_size)
    with pytest.raises(ValueError, match="batch_size"):
        IdConsistency(dino_dir, device="cpu", batch_size=0)


def test_id_consistency_sees_the_animal_not_the_background(dino_dir):
    """The same animal patch moving over changing backgrounds scores 1; changing patches score less."""
    rng = np.random.default_rng(1)
    patch = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, size=(6, 64, 96, 3), dtype=np.uint8)
    boxes = np.zeros((6, 4), dtype=np.float32)
    for t in range(6):
        x, y = 5 + 10 * t, 4 + 5 * t
        frames[t, y : y + 20, x : x + 30] = patch
        boxes[t] = [x, y, x + 29, y + 19]
    metric = IdConsistency(dino_dir, device="cpu")
    assert metric.score(frames, boxes) == pytest.approx(1.0, abs=1e-5)
    changed = frames.copy()
    for t in range(1, 6):
        x, y = 5 + 10 * t, 4 + 5 * t
        changed[t, y : y + 20, x : x + 30] = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    assert metric.score(changed, boxes) < 0.9999
    assert math.isnan(metric.score(frames, np.full((6, 4), np.nan)))
    with pytest.raises(ValueError, match=r"animal_boxes must be \(6, 4\)"):
        metric.score(frames, boxes[:5])
    with pytest.raises(FileNotFoundError, match="no_dino"):
        IdConsistency(dino_dir.parent / "no_dino", device="cpu")


def reference_clip_iqa(clip_dir, frames, prompts, **image_kwargs):
    """CLIP-IQA as piq/pyiqa compute it: normalised embeddings, logit_scale, softmax, first prob."""
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(clip_dir)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        text = processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
        outputs = model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"],
            pixel_values=processor.image_processor(list(frames), return_tensors="pt", **image_kwargs)["pixel_values"],
            interpolate_pos_encoding=bool(image_kwargs),
        )
    # CLIPModel's logits_per_image are logit_scale * cos(image, text) of the normalised embeddings.
    return outputs.logits_per_image.softmax(dim=-1)[:, 0].numpy()


def test_clip_iqa_matches_reference(clip_dir):
    frames = np.random.default_rng(2).integers(0, 256, size=(5, 40, 72, 3), dtype=np.uint8)
    metric = ClipIqa(clip_dir, device="cpu", batch_size=2)
    got = metric.frame_scores(frames)
    ref = reference_clip_iqa(clip_dir, frames, ("Natural photo.", "Synthetic photo."))
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert got.shape == (5,) and np.all((got > 0) & (got < 1))
    assert metric.score(frames) == pytest.approx(float(ref.mean()), abs=1e-6)
    # The antonym pair is a two-way softmax: swapping the prompts gives 1 - p.
    swapped = ClipIqa(clip_dir, device="cpu", prompts=("Synthetic photo.", "Natural photo.")).frame_scores(frames)
    np.testing.assert_allclose(swapped, 1 - got, atol=1e-6)
    native = ClipIqa(clip_dir, device="cpu", native_resolution=True).frame_scores(frames)
    ref_native = reference_clip_iqa(
        clip_dir, frames, ("Natural photo.", "Synthetic photo."), do_resize=False, do_center_crop=False
    )
    np.testing.assert_allclose(native, ref_native, atol=1e-6)
