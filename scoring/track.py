"""Video object tracking with SAM 2, seeded with boxes on one frame (SPEC section 4).

One small interface, :class:`Tracker`, with two backends:

- ``"transformers"`` (default): transformers' ``Sam2VideoModel`` + ``Sam2VideoProcessor`` from a
  local Hugging Face folder (reference weights: SAM 2.1 hiera-large, ``facebook/sam2.1-hiera-large``).
- ``"sam2"``: Meta's ``sam2`` package (``pip install -e .[sam2]``; build it with
  ``SAM2_BUILD_CUDA=0`` where there is no CUDA toolkit), from an original ``.pt`` checkpoint.

Both seed every object with its box on ``start_frame``, propagate forward to the last frame and
backward to frame 0, and turn each frame's mask into its tight box: ``(x0, y0, x1, y1)`` with x1/y1
the last mask column/row (inclusive, as ``supervision.mask_to_xyxy`` in Grounded-SAM-2 gives it);
an empty mask gives a NaN row.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from scoring.detect import check_frames
from spatialalign_jax.common.detection import Tracker  # noqa: F401  (the interface the trackers implement)
from scoring.loading import device_and_dtype, load_pretrained, load_processor

BACKENDS = ("transformers", "sam2")


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``(x0, y0, x1, y1)`` of each boolean (N, H, W) mask (inclusive ends) as (N, 4) float32
    on the masks' device; NaN rows for empty masks."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    y0, y1 = _first_last(rows)
    x0, x1 = _first_last(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return boxes.masked_fill(~rows.any(dim=1, keepdim=True), torch.nan)


def _first_last(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last True index of each row of an (N, L) bool tensor (junk for an all-False row)."""
    index = torch.arange(hit.shape[1], device=hit.device)
    return torch.where(hit, index, hit.shape[1]).amin(dim=1), torch.where(hit, index, -1).amax(dim=1)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight ``(x0, y0, x1, y1)`` of a boolean (H, W) mask (inclusive ends); NaN when empty."""
    return masks_to_boxes(torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None])[0].numpy()


def _check_seed(frames: np.ndarray, start_frame: int, boxes: Mapping[str, np.ndarray]) -> np.ndarray:
    """The seed boxes as an (N, 4) float32 array, with clear errors on bad arguments."""
    if not 0 <= start_frame < len(frames):
        raise ValueError(f"start_frame {start_frame} is outside the video's {len(frames)} frames")
    if not boxes:
        raise ValueError("boxes is empty: give at least one object's seed box")
    seeds = []
    for name, box in boxes.items():
        box = np.asarray(box, dtype=np.float32).reshape(-1)
        if box.shape != (4,) or not np.all(np.isfinite(box)):
            raise ValueError(f"seed box of {name!r} must be 4 finite numbers (x0, y0, x1, y1), got {box}")
        seeds.append(box)
    return np.stack(seeds)


class _Sam2Tracker:
    """The loop both backends share; a backend supplies ``_propagate``, the masks of every frame."""

    def _propagate(
        self, frames: np.ndarray, start_frame: int, seeds: np.ndarray
    ) -> Iterator[tuple[int, Sequence[int], torch.Tensor]]:
        """Seed object ``i + 1`` with ``seeds[i]`` on ``start_frame``, propagate forward to the last
        frame, then backward to frame 0; per step: the frame, its object ids, their (N, H, W) bool
        masks at the frames' resolution."""
        raise NotImplementedError

    def track(
        self, frames: np.ndarray, start_frame: int, boxes: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        frames = check_frames(frames)
        seeds = _check_seed(frames, start_frame, boxes)
        names = list(boxes)
        out = {name: np.full((len(frames), 4), np.nan, dtype=np.float32) for name in names}
        # closing(): an error here must still end the backend's contexts (autocast, temporary folder).
        with torch.inference_mode(), closing(self._propagate(frames, start_frame, seeds)) as steps:
            for frame_idx, obj_ids, masks in steps:
                # Boxes are computed where the masks are: only 4 numbers per object reach the host.
                for obj_id, box in zip(obj_ids, masks_to_boxes(masks).cpu().numpy()):
                    out[names[obj_id - 1]][frame_idx] = box
        return out


class TransformersSam2Tracker(_Sam2Tracker):
    """SAM 2 video tracking through transformers' ``Sam2VideoModel`` (the default backend)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        from transformers import Sam2VideoModel, Sam2VideoProcessor

        self.model, self.device, self.dtype = load_pretrained(
            Sam2VideoModel, model_dir, "SAM 2 video", device, dtype, expect=("sam2_video",)
        )
        self.processor = load_processor(Sam2VideoProcessor, model_dir, "SAM 2 video")

    def _propagate(
        self, frames: np.ndarray, start_frame: int, seeds: np.ndarray
    ) -> Iterator[tuple[int, Sequence[int], torch.Tensor]]:
        height, width = frames.shape[1:3]
        session = self.processor.init_video_session(
            video=list(frames), inference_device=self.device, dtype=self.dtype
        )
        self.processor.add_inputs_to_inference_session(
            inference_session=session,
            frame_idx=start_frame,
            obj_ids=list(range(1, len(seeds) + 1)),  # the session keeps and mutates this list
            input_boxes=[seeds.tolist()],
        )
        # The seed frame's own masks come from the first step of the forward pass; the backward
        # pass starts on the seed frame again and reuses its conditioning output.
        for reverse in (False, True):
            for step in self.model.propagate_in_video_iterator(
                session, start_frame_idx=start_frame, reverse=reverse
            ):
                masks = self.processor.post_process_masks(
                    [step.pred_masks.float()], original_sizes=[[height, width]], binarize=True
                )[0]
                yield step.frame_idx, step.object_ids, masks[:, 0]


def _sam2_config_for(checkpoint: Path) -> str:
    """The sam2 package's config for a checkpoint file name, via sam2's own table of releases."""
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    for config_name, ckpt_name in HF_MODEL_ID_TO_FILENAMES.values():
        if checkpoint.name == ckpt_name:
            return config_name
    return "configs/sam2.1/sam2.1_hiera_l.yaml"


class Sam2PackageTracker(_Sam2Tracker):
    """SAM 2 video tracking through Meta's ``sam2`` package (optional backend).

    ``model_dir`` is an original ``.pt`` checkpoint, or a folder holding exactly one. ``config`` is
    the package's config name; by default it follows the checkpoint's file name
    (``sam2.1_hiera_large.pt`` -> ``configs/sam2.1/sam2.1_hiera_l.yaml``) and falls back to SAM 2.1
    hiera-large. ``hydra_overrides`` are passed to ``build_sam2_video_predictor`` as extra overrides.
    The package reads videos from JPEG folders only, so frames are written as JPEG (quality 95, as
    in Grounded-SAM-2's demos) to a temporary folder.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        config: str | None = None,
        hydra_overrides: Sequence[str] = (),
    ):
        try:
            from sam2.build_sam import build_sam2_video_predictor
        except ImportError as err:
            raise ImportError(
                "the 'sam2' tracker backend needs Meta's sam2 package: "
                "SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e .[sam2] (or use backend='transformers')"
            ) from err
        checkpoint = self._find_checkpoint(Path(model_dir))
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.predictor = build_sam2_video_predictor(
            config or _sam2_config_for(checkpoint),
            ckpt_path=str(checkpoint),
            device=self.device,
            hydra_overrides_extra=list(hydra_overrides),
        )

    @staticmethod
    def _find_checkpoint(path: Path) -> Path:
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(
                f"SAM 2 (sam2 package): checkpoint {str(path)!r} does not exist. Pass an original "
                f"SAM 2 .pt checkpoint or a folder holding one; models are never downloaded at run time."
            )
        found = sorted(path.glob("*.pt"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"SAM 2 (sam2 package): folder {str(path)!r} must hold exactly one .pt checkpoint, "
                f"found {[p.name for p in found]}; pass the checkpoint file itself instead."
            )
        return found[0]

    def _propagate(
        self, frames: np.ndarray, start_frame: int, seeds: np.ndarray
    ) -> Iterator[tuple[int, Sequence[int], torch.Tensor]]:
        from PIL import Image

        autocast = torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
        with tempfile.TemporaryDirectory(prefix="sam2_frames_") as tmp, autocast:
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(os.path.join(tmp, f"{i:05d}.jpg"), quality=95)
            state = self.predictor.init_state(video_path=tmp)
            for obj_id, seed in enumerate(seeds, start=1):
                self.predictor.add_new_points_or_box(
                    inference_state=state, frame_idx=start_frame, obj_id=obj_id, box=seed
                )
            for reverse in (False, True):
                for frame_idx, obj_ids, mask_logits in self.predictor.propagate_in_video(
                    state, start_frame_idx=start_frame, reverse=reverse
                ):
                    yield frame_idx, obj_ids, mask_logits[:, 0] > 0.0


def make_tracker(
    backend: str,
    model_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **backend_options,
) -> Tracker:
    """A tracker of ``backend`` ("transformers" or "sam2") loaded from ``model_dir``.

    ``backend_options`` go to the backend's constructor (for "sam2": ``config``, ``hydra_overrides``).
    """
    if backend == "transformers":
        return TransformersSam2Tracker(model_dir, device=device, dtype=dtype, **backend_options)
    if backend == "sam2":
        return Sam2PackageTracker(model_dir, device=device, dtype=dtype, **backend_options)
    raise ValueError(f"unknown tracker backend {backend!r}; choose one of {BACKENDS}")
