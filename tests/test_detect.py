"""Grounding DINO detection: loading, batching, thresholds and label matching (tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scoring.detect import GroundingDinoDetector, detection_text, normalize_label
from tests import tiny_scoring_models as tiny


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    return tiny.grounding_dino(tmp_path_factory.mktemp("gdino"))


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, size=(5, 100, 140, 3), dtype=np.uint8)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_gdino"):
        GroundingDinoDetector(tmp_path / "no_such_gdino", device="cpu")


def test_text_and_label_normalisation():
    assert detection_text("Teddy Bear ", "chair") == "teddy bear. chair."
    assert normalize_label(" Teddy  bear. [SEP]") == "teddy bear"


def test_matches_transformers_reference_and_is_batch_invariant(gdino_dir, frames):
    """detect() equals a direct processor + model + post-processing run, for any batch size.

    With random weights the thresholds are lowered so that boxes come out; boxes agree to 1e-4 px.
    """
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    kwargs = dict(device="cpu", box_threshold=0.05, text_threshold=0.05)
    per_frame = GroundingDinoDetector(gdino_dir, batch_size=1, **kwargs).detect(frames, "dog", "teddy bear")
    batched = GroundingDinoDetector(gdino_dir, batch_size=3, **kwargs).detect(frames, "dog", "teddy bear")

    processor = AutoProcessor.from_pretrained(gdino_dir)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(gdino_dir).eval()
    assert len(per_frame) == len(batched) == len(frames)
    total = 0
    for i, frame in enumerate(frames):
        inputs = processor(images=frame, text="dog. teddy bear.", return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        ref = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.05, text_threshold=0.05, target_sizes=[frame.shape[:2]]
        )[0]
        for dets in (per_frame[i], batched[i]):
            assert len(dets) == len(ref["scores"])
            for det, box, score, label in zip(dets, ref["boxes"], ref["scores"], ref["text_labels"]):
                np.testing.assert_allclose(det.box, box.numpy(), atol=1e-4)
                assert det.score == pytest.approx(score.item(), abs=1e-5)
                assert normalize_label(det.label) == normalize_label(label)
                assert det.score > 0.05
        total += len(per_frame[i])
    assert total > 0, "the thresholds must let some boxes through for this test to mean anything"


def test_thresholds_filter(gdino_dir, frames):
    loose = GroundingDinoDetector(gdino_dir, device="cpu", box_threshold=0.0, text_threshold=0.0)
    strict = GroundingDinoDetector(gdino_dir, device="cpu", box_threshold=0.999, text_threshold=0.3)
    loose_dets = loose.detect(frames[:2], "dog", "chair")
    assert all(len(dets) == 12 for dets in loose_dets)  # every query of the tiny model
    assert all(len(dets) < 12 for dets in strict.detect(frames[:2], "dog", "chair"))
    for dets in loose_dets:
        for det in dets:
            assert det.box.shape == (4,) and det.box.dtype == np.float32


def test_labels_are_reported_under_the_callers_names(gdino_dir):
    detector = GroundingDinoDetector(gdino_dir, device="cpu")
    # The tokenizer's own forms: lower case, word pieces re-joined, punctuation split off.
    assert detector.canonical_label("Teddy Bear") == "teddy bear"
    assert detector.canonical_label("t-shirt") == "t - shirt"
    names = {detector.canonical_label("Teddy Bear"): "Teddy Bear", detector.canonical_label("t-shirt"): "t-shirt"}
    result = {
        "boxes": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [0, 0, 1, 1], [0, 0, 2, 2]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "text_labels": ["teddy bear", "t - shirt", "bear", "teddy bear t - shirt"],
    }
    dets = detector._frame_detections(result, names)
    assert [d.label for d in dets] == ["Teddy Bear", "t-shirt", "bear", "teddy bear t - shirt"]
    np.testing.assert_array_equal(dets[1].box, [5, 6, 7, 8])


def test_bad_frames_are_rejected(gdino_dir):
    detector = GroundingDinoDetector(gdino_dir, device="cpu")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        detector.detect(np.zeros((2, 100, 100), dtype=np.uint8), "dog", "chair")


def test_a_folder_of_another_model_or_without_its_processor_is_refused(gdino_dir, tmp_path):
    """A transformers folder of another architecture would load with random weights and only a warning."""
    import shutil

    from scoring.loading import ModelFolderError
    from scoring.text_encoder import UMT5TextEncoder

    with pytest.raises(ModelFolderError, match="holds a 'grounding-dino' model, not 'umt5'"):
        UMT5TextEncoder(gdino_dir, device="cpu")
    bare = tmp_path / "bare"
    shutil.copytree(gdino_dir, bare)
    (bare / "processor_config.json").unlink()
    with pytest.raises(ModelFolderError, match="Grounding DINO: cannot load its preprocessing files"):
        GroundingDinoDetector(bare, device="cpu")
