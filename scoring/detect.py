"""Open-vocabulary detection of the animal and the object with Grounding DINO (SPEC section 4).

Grounding DINO runs through transformers (``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``)
from a local folder in Hugging Face format (the reference weights are
``IDEA-Research/grounding-dino-tiny``). Every frame is queried with the text ``"{animal}. {object}."``,
boxes are kept above the box threshold (0.4) and labelled with the prompt tokens above the text
threshold (0.3), as transformers' ``post_process_grounded_object_detection`` does.

Labels: Grounding DINO labels a box with the decoded text of the prompt tokens that pass the text
threshold, so a label is a phrase such as ``"teddy bear"``, a part of one (``"bear"``), several
phrases run together (``"teddy bear chair"``) or empty. The detector compares that phrase with the
animal and the object *after both went through the same tokenizer* (lower-casing, word-piece
decoding, ``"t-shirt"`` -> ``"t - shirt"``), and reports the box under the caller's own name
(``animal`` or ``obj``) when it matches one exactly; any other phrase is reported as decoded, and the
validity rules count it as a wrong label.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from scoring.loading import load_pretrained, load_processor
# The interface every detector implements (the colour detector of the synthetic world too).
from spatialalign_jax.common.detection import BOX_THRESHOLD, Detection, Detector, check_frames  # noqa: F401

TEXT_THRESHOLD = 0.3


def normalize_label(text: str) -> str:
    """Lower-case, drop the prompt's full stops and special tokens, collapse white space."""
    for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
        text = text.replace(special, " ")
    return " ".join(text.replace(".", " ").lower().split())


def detection_text(animal: str, obj: str) -> str:
    """The Grounding DINO query of SPEC section 4: ``"{animal}. {object}."`` (lower case, as trained)."""
    return f"{animal.strip().lower()}. {obj.strip().lower()}."


class GroundingDinoDetector:
    """Grounding DINO from a local folder; frames are detected in batches of ``batch_size``.

    ``device`` defaults to CUDA when available; ``dtype`` (e.g. ``torch.float16`` on a GPU) is the
    precision of the weights and pixel values, float32 by default; post-processing runs in float32.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
    ):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.model, self.device, self.dtype = load_pretrained(
            AutoModelForZeroShotObjectDetection, model_dir, "Grounding DINO", device, dtype, expect=("grounding-dino",)
        )
        self.processor = load_processor(AutoProcessor, model_dir, "Grounding DINO")

    def canonical_label(self, name: str) -> str:
        """``name`` as it comes back from the tokenizer: the form Grounding DINO's labels take."""
        ids = self.processor.tokenizer(name.strip().lower(), add_special_tokens=False)["input_ids"]
        return normalize_label(self.processor.tokenizer.decode(ids))

    @torch.inference_mode()
    def detect(self, frames: np.ndarray, animal: str, obj: str) -> list[list[Detection]]:
        """Per frame of ``frames`` (T, H, W, 3) uint8, the detections above both thresholds."""
        frames = check_frames(frames)
        text = detection_text(animal, obj)
        names = {self.canonical_label(animal): animal, self.canonical_label(obj): obj}
        height, width = frames.shape[1:3]
        results: list[list[Detection]] = []
        for start in range(0, len(frames), self.batch_size):
            batch = list(frames[start : start + self.batch_size])
            inputs = self.processor(images=batch, text=[text] * len(batch), return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            outputs = self.model(**inputs)
            outputs.logits = outputs.logits.float()
            outputs.pred_boxes = outputs.pred_boxes.float()
            processed = self.processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[(height, width)] * len(batch),
            )
            for frame_result in processed:
                results.append(self._frame_detections(frame_result, names))
        return results

    @staticmethod
    def _frame_detections(frame_result: dict, names: dict[str, str]) -> list[Detection]:
        boxes = frame_result["boxes"].detach().float().cpu().numpy().astype(np.float32)
        scores = frame_result["scores"].detach().float().cpu().numpy()
        labels: Sequence[str] = frame_result["text_labels"]
        detections = []
        for label, box, score in zip(labels, boxes, scores):
            phrase = normalize_label(label)
            detections.append(Detection(names.get(phrase, phrase), box, float(score)))
        return detections
