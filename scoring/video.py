"""Reading and writing mp4 videos with PyAV; file naming of scored videos.

Videos are named ``{prompt_id}_{seed}.mp4`` (``{prompt_id}.mp4`` is read as seed 0). Prompt ids
may themselves contain underscores, so a name is resolved against the known prompt ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection

import av
import numpy as np

from spatialalign_jax.common.atomic import atomic_path

DEFAULT_FPS = 16  # Wan2.1's frame rate


class VideoError(Exception):
    """A video that cannot be used; ``kind`` is "unreadable" or "frame_count"."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def read_video(path: str | os.PathLike, num_frames: int | None = None) -> np.ndarray:
    """All frames of ``path`` as (T, H, W, 3) uint8 RGB; ``num_frames`` (if given) must equal T.

    Raises ``VideoError`` naming the file for a missing, unreadable, corrupt or empty video, or a
    wrong frame count.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video {str(path)!r} does not exist", "unreadable")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"video {str(path)!r} has no video stream", "unreadable")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"video {str(path)!r} is unreadable or corrupt: {e}", "unreadable") from e
    if not frames:
        raise VideoError(f"video {str(path)!r} decodes to no frames (corrupt or empty)", "unreadable")
    if len({f.shape for f in frames}) != 1:
        raise VideoError(f"video {str(path)!r} changes frame size mid-stream", "unreadable")
    video = np.stack(frames)
    if num_frames is not None and len(video) != num_frames:
        raise VideoError(
            f"video {str(path)!r} has {len(video)} frames, expected {num_frames}", "frame_count"
        )
    return video


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = DEFAULT_FPS, crf: int = 18) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as an H.264 mp4, atomically (temp file + rename).

    Odd frame sizes are padded by one edge pixel (yuv420p needs even sizes); ``crf`` 0 is lossless
    in luma.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def video_name(prompt_id: str, seed: int) -> str:
    """File name of one sample's video."""
    return f"{prompt_id}_{int(seed)}.mp4"


def parse_video_name(name: str, prompt_ids: Collection[str]) -> tuple[str, int] | None:
    """(prompt_id, seed) of a ``{prompt_id}_{seed}.mp4`` or ``{prompt_id}.mp4`` file; None when unknown.

    ``{prompt_id}_{seed}`` wins when both readings name a known prompt.
    """
    stem = Path(name).stem
    head, sep, tail = stem.rpartition("_")
    if sep and tail.isdigit() and head in prompt_ids:
        return head, int(tail)
    if stem in prompt_ids:
        return stem, 0
    return None
