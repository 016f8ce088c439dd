"""SAM 2 tracking: tight boxes, forward + backward propagation from the seed frame, both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scoring.track import (
    Sam2PackageTracker,
    TransformersSam2Tracker,
    make_tracker,
    mask_to_box,
    masks_to_boxes,
)
from tests import tiny_scoring_models as tiny

SEEDS = {"animal": np.array([10.0, 12.0, 50.0, 60.0]), "object": np.array([60.0, 20.0, 110.0, 90.0])}


def reference_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight inclusive box of each (H, W) mask, written independently of scoring.track."""
    out = []
    for mask in masks:
        ys, xs = np.where(mask)
        out.append([xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else [np.nan] * 4)
    return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(1).integers(0, 256, size=(6, 96, 120, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory):
    return tiny.sam2_video(tmp_path_factory.mktemp("sam2"))


def test_mask_to_box():
    mask = np.zeros((10, 12), dtype=bool)
    assert np.isnan(mask_to_box(mask)).all()
    mask[2:5, 3:9] = True
    mask[7, 1] = True
    np.testing.assert_array_equal(mask_to_box(mask), [1, 2, 8, 7])
    one = np.zeros((4, 4), dtype=bool)
    one[1, 2] = True
    np.testing.assert_array_equal(mask_to_box(one), [2, 1, 2, 1])  # a one-pixel mask: zero width


def test_masks_to_boxes_batched():
    """Boxes of several masks at once (the trackers' on-device path), empty masks included."""
    masks = np.random.default_rng(0).random((5, 9, 13)) > 0.97
    masks[2] = False
    masks[3] = False
    masks[3, 8, 12] = True  # a one-pixel mask in the last row and column
    got = masks_to_boxes(torch.from_numpy(masks))
    assert got.dtype == torch.float32 and got.shape == (5, 4)
    got = got.numpy()
    np.testing.assert_array_equal(got, reference_boxes(masks))
    assert np.isnan(got[2]).all() and np.isfinite(got[[0, 1, 3, 4]]).all()


def test_transformers_tracker_matches_a_hand_run_session(sam2_dir, frames):
    """Boxes equal a frame-by-frame run of Sam2VideoModel (seed, forward, then backward with
    reverse=True) with independently computed tight boxes; every frame is covered."""
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    start = 2
    tracker = make_tracker("transformers", sam2_dir, device="cpu")
    assert isinstance(tracker, TransformersSam2Tracker)
    got = tracker.track(frames, start, SEEDS)

    processor = Sam2VideoProcessor.from_pretrained(sam2_dir)
    model = Sam2VideoModel.from_pretrained(sam2_dir).eval()
    session = processor.init_video_session(video=list(frames), inference_device="cpu")
    processor.add_inputs_to_inference_session(
        session, frame_idx=start, obj_ids=[1, 2], input_boxes=[[SEEDS["animal"].tolist(), SEEDS["object"].tolist()]]
    )
    expected = {name: np.full((len(frames), 4), np.nan, dtype=np.float32) for name in SEEDS}
    order = [(i, False) for i in range(start, len(frames))] + [(i, True) for i in range(start, -1, -1)]
    with torch.inference_mode():
        for frame_idx, reverse in order:
            out = model(inference_session=session, frame_idx=frame_idx, reverse=reverse)
            masks = processor.post_process_masks([out.pred_masks], original_sizes=[frames.shape[1:3]])[0]
            boxes = reference_boxes(masks[:, 0].numpy())
            expected["animal"][frame_idx], expected["object"][frame_idx] = boxes

    for name in SEEDS:
        assert got[name].shape == (len(frames), 4) and got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], expected[name])
    # Random weights still give non-empty masks here, so the comparison covers real boxes.
    assert np.isfinite(got["animal"]).all(axis=1).sum() >= 4


def test_transformers_tracker_visits_every_frame_both_ways(sam2_dir, frames, monkeypatch):
    tracker = TransformersSam2Tracker(sam2_dir, device="cpu")
    visited = []
    original = tracker.model.propagate_in_video_iterator

    def spy(session, start_frame_idx=None, reverse=False, **kwargs):
        for step in original(session, start_frame_idx=start_frame_idx, reverse=reverse, **kwargs):
            visited.append((step.frame_idx, reverse))
            yield step

    monkeypatch.setattr(tracker.model, "propagate_in_video_iterator", spy)
    tracker.track(frames, 3, SEEDS)
    assert visited == [(3, False), (4, False), (5, False), (3, True), (2, True), (1, True), (0, True)]
    visited.clear()
    tracker.track(frames, 0, SEEDS)  # seeded on the first frame: nothing to do backwards
    assert [f for f, _ in visited] == [0, 1, 2, 3, 4, 5]


def test_tracker_errors(sam2_dir, frames, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_sam"):
        make_tracker("transformers", tmp_path / "missing_sam", device="cpu")
    with pytest.raises(ValueError, match="unknown tracker backend"):
        make_tracker("sam3", sam2_dir)
    tracker = TransformersSam2Tracker(sam2_dir, device="cpu")
    with pytest.raises(ValueError, match="outside the video"):
        tracker.track(frames, len(frames), SEEDS)
    with pytest.raises(ValueError, match="seed box of 'animal'"):
        tracker.track(frames, 0, {"animal": np.array([1.0, 2.0, np.nan, 4.0])})


def test_sam2_package_backend_matches_its_own_api(frames, tmp_path):
    """The optional Meta `sam2` backend against the package's README usage on the same tiny
    checkpoint (frames fed through the same JPEG folder the backend writes)."""
    pytest.importorskip("sam2", reason="optional extra: SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e .[sam2]")
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    checkpoint = tiny.sam2_package_checkpoint(tmp_path / "ckpt")
    kwargs = dict(config=tiny.SAM2_PACKAGE_CONFIG, hydra_overrides=tiny.SAM2_PACKAGE_OVERRIDES)
    tracker = make_tracker("sam2", checkpoint.parent, device="cpu", **kwargs)
    assert isinstance(tracker, Sam2PackageTracker)
    start = 2
    got = tracker.track(frames, start, SEEDS)

    jpeg_dir = tmp_path / "jpegs"
    jpeg_dir.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(jpeg_dir / f"{i}.jpg", quality=95)
    predictor = build_sam2_video_predictor(
        tiny.SAM2_PACKAGE_CONFIG, str(checkpoint), device="cpu",
        hydra_overrides_extra=list(tiny.SAM2_PACKAGE_OVERRIDES),
    )
    expected = {name: np.full((len(frames), 4), np.nan, dtype=np.float32) for name in SEEDS}
    with torch.inference_mode():
        state = predictor.init_state(video_path=str(jpeg_dir))
        for obj_id, name in ((1, "animal"), (2, "object")):
            predictor.add_new_points_or_box(state, frame_idx=start, obj_id=obj_id, box=SEEDS[name])
        for reverse in (False, True):
            for frame_idx, obj_ids, logits in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                boxes = reference_boxes((logits[:, 0] > 0).numpy())
                for obj_id, box in zip(obj_ids, boxes):
                    expected["animal" if obj_id == 1 else "object"][frame_idx] = box
    for name in SEEDS:
        np.testing.assert_array_equal(got[name], expected[name])
    assert np.isfinite(got["animal"]).all()  # the biased object-score head keeps masks non-empty


def test_sam2_package_backend_errors(tmp_path):
    pytest.importorskip("sam2", reason="optional extra: SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e .[sam2]")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_tracker("sam2", tmp_path / "nowhere", device="cpu")
    (tmp_path / "a.pt").touch()
    (tmp_path / "b.pt").touch()
    with pytest.raises(FileNotFoundError, match="exactly one .pt"):
        make_tracker("sam2", tmp_path, device="cpu")
