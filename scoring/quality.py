"""Video quality metrics of the evaluation: ID consistency (DINOv2) and CLIP-IQA "natural".

ID consistency (paper, appendix A1.1): VBench's *subject consistency* computed on the animal's box
crop instead of the whole frame. Each crop is resized as VBench's ``dino_transform(224)`` does
(shorter side to 224, aspect kept, bilinear without antialiasing; scaled to [0, 1], ImageNet mean/std)
and encoded by DINOv2 (transformers ``AutoModel`` from a local folder; the feature is
``pooler_output``, the layer-normed CLS token). With L2-normalised features f_0..f_{n-1} of the
frames that have an animal box (frames without one, or whose box is a sliver more than 4 times as
long as it is wide, are skipped),

    ID = 1/(n-1) * sum_{i>=1} ( max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i)) ) / 2,

VBench's mean of the similarity to the previous and to the first frame. NaN with fewer than two
crops. A box ``(x0, y0, x1, y1)`` crops pixels ``[floor(x0), floor(x1)]`` inclusive (the tracker's
boxes have inclusive ends), clipped to the frame.

CLIP-IQA "natural" (Wang et al., AAAI 2023, as pyiqa/piq compute it): the softmax, over the antonym
pair ``("Natural photo.", "Synthetic photo.")``, of ``logit_scale * cos(image, text)`` with CLIP's
L2-normalised embeddings; the score is the probability of the first prompt, averaged over the
video's frames. CLIP runs through transformers' ``CLIPModel`` from a local folder. The reference
CLIP-IQA uses a ResNet-50 CLIP at the frame's native resolution with its positional embedding off;
a ViT CLIP cannot drop its positional embedding, so by default frames go through the folder's
CLIP image processor (resize + 224 centre crop); ``native_resolution=True`` instead feeds whole
frames with interpolated positional embeddings. Absolute values therefore depend on the CLIP
checkpoint and are comparable between models scored with the same settings.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from scoring.detect import check_frames
from scoring.loading import load_pretrained, load_processor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE = 224
NATURAL_PROMPTS = ("Natural photo.", "Synthetic photo.")


def subject_consistency(features: np.ndarray) -> float:
    """VBench's subject consistency of (N, D) features (normalised here); NaN when N < 2."""
    feats = np.asarray(features, dtype=np.float64)
    if len(feats) < 2:
        return math.nan
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    to_previous = np.maximum(0.0, np.sum(feats[1:] * feats[:-1], axis=1))
    to_first = np.maximum(0.0, feats[1:] @ feats[0])
    return float(np.mean((to_previous + to_first) / 2))


# A sliver of a box (an animal leaving the frame) resized to 224 on its short side becomes a huge
# DINOv2 input (480 x 1 px -> 107520 x 224) whose feature says little about the animal: skip it.
MAX_CROP_ASPECT = 4.0


def crop_box(frame: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """The (h, w, 3) crop of ``box`` in ``frame``, or None when the box is missing, empty or a sliver
    (one side more than ``MAX_CROP_ASPECT`` times the other)."""
    if not np.all(np.isfinite(box)):
        return None
    height, width = frame.shape[:2]
    x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x1, y1 = min(int(math.floor(box[2])), width - 1), min(int(math.floor(box[3])), height - 1)
    if x1 < x0 or y1 < y0:
        return None
    h, w = y1 - y0 + 1, x1 - x0 + 1
    if max(h, w) > MAX_CROP_ASPECT * min(h, w):
        return None
    return frame[y0 : y1 + 1, x0 : x1 + 1]


class IdConsistency:
    """ID consistency of the animal with DINOv2 from a local folder (e.g. ``facebook/dinov2-base``).

    At most ``batch_size`` crops go through DINOv2 per forward.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
    ):
        from transformers import AutoModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.model, self.device, self.dtype = load_pretrained(
            AutoModel, model_dir, "DINOv2", device, dtype, expect=("dinov2", "dinov2_with_registers"))
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def preprocess(self, crop: np.ndarray) -> torch.Tensor:
        """VBench's ``dino_transform(224)`` of one (h, w, 3) uint8 crop -> (1, 3, H, W) float."""
        from torchvision.transforms.functional import resize

        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
        x = resize(x, DINO_SIZE, antialias=False).float() / 255.0  # on uint8, like VBench
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def features(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32 DINOv2 CLS features (``pooler_output``) of the crops, in their order."""
        pixels = [self.preprocess(crop) for crop in crops]
        # Resizing keeps each crop's aspect ratio, so only crops that come out the same shape can
        # share a forward: padding the others would change their features.
        same_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(pixels):
            same_shape.setdefault(tuple(x.shape), []).append(i)
        out = np.zeros((len(crops), self.model.config.hidden_size), np.float32)
        for indices in same_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.cat([pixels[i] for i in chunk]).to(self.device, self.dtype)
                out[chunk] = self.model(pixel_values=batch).pooler_output.float().cpu().numpy()
        return out

    def score(self, frames: np.ndarray, animal_boxes: np.ndarray) -> float:
        """ID consistency of one video: frames (T, H, W, 3) uint8, animal boxes (T, 4) with NaN rows."""
        frames = check_frames(frames)
        animal_boxes = np.asarray(animal_boxes, dtype=np.float64)
        if animal_boxes.shape != (len(frames), 4):
            raise ValueError(f"animal_boxes must be ({len(frames)}, 4) for {len(frames)} frames, got {animal_boxes.shape}")
        crops = [c for c in (crop_box(f, b) for f, b in zip(frames, animal_boxes)) if c is not None]
        return subject_consistency(self.features(crops))

    __call__ = score


class ClipIqa:
    """CLIP-IQA with an antonym prompt pair (default "natural") through transformers' ``CLIPModel``."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        prompts: tuple[str, str] = NATURAL_PROMPTS,
        native_resolution: bool = False,
    ):
        from transformers import AutoProcessor, CLIPModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.native_resolution = native_resolution
        self.model, self.device, self.dtype = load_pretrained(CLIPModel, model_dir, "CLIP", device, dtype,
                                                                  expect=("clip",))
        self.processor = load_processor(AutoProcessor, model_dir, "CLIP")
        with torch.inference_mode():
            text = self.processor.tokenizer(list(prompts), padding=True, return_tensors="pt").to(self.device)
            anchors = self._embedding(self.model.get_text_features(**text)).float()
        self.anchors = anchors / anchors.norm(dim=-1, keepdim=True)
        self.logit_scale = self.model.logit_scale.exp().float()

    @staticmethod
    def _embedding(output) -> torch.Tensor:
        # get_*_features return a tensor, or in newer transformers an output whose pooler is the embedding
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.inference_mode()
    def frame_scores(self, frames: np.ndarray) -> np.ndarray:
        """(T,) probability of the first prompt for each frame of (T, H, W, 3) uint8 ``frames``."""
        frames = check_frames(frames)
        scores = []
        for start in range(0, len(frames), self.batch_size):
            batch = list(frames[start : start + self.batch_size])
            if self.native_resolution:
                inputs = self.processor.image_processor(
                    batch, do_resize=False, do_center_crop=False, return_tensors="pt"
                )
                kwargs = {"interpolate_pos_encoding": True}
            else:
                inputs = self.processor.image_processor(batch, return_tensors="pt")
                kwargs = {}
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            image = self._embedding(self.model.get_image_features(pixel_values=pixels, **kwargs)).float()
            image = image / image.norm(dim=-1, keepdim=True)
            probs = (self.logit_scale * image @ self.anchors.T).softmax(dim=-1)
            scores.append(probs[:, 0].cpu().numpy())
        return np.concatenate(scores)

    def score(self, frames: np.ndarray) -> float:
        """The video's CLIP-IQA: the mean of its frames' scores."""
        return float(np.mean(self.frame_scores(frames)))

    __call__ = score
