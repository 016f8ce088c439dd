"""World videos: an animal sprite moving around a static object sprite over a flat background.

A video is rendered at ``LATENT_FRAMES`` key frames of ``LATENT_SIZE`` px, which *are* its latents
(pixels scaled to [-1, 1], channels first: ``(3, F, H, W)``). Decoding is the world's VAE: it
repeats them in time with the Wan VAE's causal 4x factor (frame 0 from key frame 0, frames 4j-3..4j
from key frame j) and in space by ``SPATIAL_SCALE``, so 6 key frames of 16 px make the store's
``4(F-1)+1 = 21`` frames of 32 px, enough for SPEC's validity rules (20 valid frames, a run of 4).

The animal moves on a circle around the object, from the angle of the initial relation to that of
the final one, so the sprites never overlap (an overlap would hide one of them from any detector):
L is angle pi, R is 0, T is -pi/2 (image y points down). L<->R goes over the top or under the
bottom (``Scene.over_top``; the pretraining videos all go over the top, one way less for a small model
to learn). It holds still on the first three and the last three key frames, so a correct video
starts and ends in its relations for several frames, as SPEC's r_init / r_f average them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.store_layout import VAE_SCALE_TEMPORAL, decoded_frames
from spatialalign_jax.world.vocab import ANIMALS, OBJECTS, SCENES

LATENT_SIZE = 16
SPATIAL_SCALE = 2
FRAME_SIZE = LATENT_SIZE * SPATIAL_SCALE  # 32
LATENT_FRAMES = 6
NUM_FRAMES = decoded_frames(LATENT_FRAMES)  # 21
LATENT_SHAPE = (3, LATENT_FRAMES, LATENT_SIZE, LATENT_SIZE)
# Position along the path at each key frame: three in the initial relation, then three in the final
# one (frames 0-8 and 9-20 once decoded). A move in one step leaves a small model two places to draw
# the animal at, not four; the DSR-Score reads only where the animal is, frame by frame.
PATH_FRACTIONS = (0.0, 0.0, 0.0, 1.0, 1.0, 1.0)
RADIUS = 5.0  # object centre to animal centre; sprites are 3 and 4 px, so they never touch
OBJECT_CENTRE = 8.0
OBJECT_JITTER = 0  # the object always sits in the centre: three animal places in all, learnable by a small model
ANGLES = {"L": math.pi, "R": 0.0, "T": -math.pi / 2}
# How a video's motion relates to its prompt (`random_scene`'s `motion`).
MOTIONS = ("follow", "reverse", "static")


@dataclass(frozen=True)
class Scene:
    """Everything that fixes one video: what is in it and how the animal moves."""

    scene: str
    animal: str
    obj: str
    initial: str  # relation codes "L", "R", "T" of the *motion*, not necessarily the prompt's
    final: str
    object_xy: tuple[int, int]
    over_top: bool  # L<->R only: the way round the object

    def key_positions(self) -> np.ndarray:
        """(LATENT_FRAMES, 2) animal centre (x, y) at each key frame."""
        a0 = ANGLES[self.initial]
        delta = (ANGLES[self.final] - a0 + math.pi) % (2 * math.pi) - math.pi
        if {self.initial, self.final} == {"L", "R"}:
            delta = abs(delta)
            # from L (pi) +pi goes through 3pi/2 = the top; from R (0) the top is -pi/2
            delta = delta if (self.initial == "L") == self.over_top else -delta
        ox, oy = self.object_xy
        angles = a0 + delta * np.asarray(PATH_FRACTIONS)
        return np.stack([ox + RADIUS * np.cos(angles), oy + RADIUS * np.sin(angles)], axis=1)


def random_scene(rng: np.random.Generator, row: dict, motion: str = "follow") -> Scene:
    """A scene for a prompt row (its scene, animal, object, type); ``motion`` says how the animal
    moves: ``follow`` the prompt's type, go the ``reverse`` way (from its final relation to its
    initial one), or stay ``static`` in its initial relation."""
    t = DSR_TYPES[row["type"]]
    if motion == "follow":
        initial, final = t.initial, t.final
    elif motion == "reverse":
        initial, final = t.final, t.initial
    elif motion == "static":
        initial = final = t.initial
    else:
        raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
    jitter = rng.integers(-OBJECT_JITTER, OBJECT_JITTER + 1, size=2)
    xy = (int(OBJECT_CENTRE + jitter[0]), int(OBJECT_CENTRE + jitter[1]))
    return Scene(row["scene"], row["animal"], row["object"], initial, final, xy, over_top=True)


def _stamp(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], cx: float, cy: float) -> None:
    h, w = mask.shape
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    ys, xs = np.nonzero(mask)
    ys, xs = ys + y0, xs + x0
    keep = (ys >= 0) & (ys < image.shape[0]) & (xs >= 0) & (xs < image.shape[1])
    image[ys[keep], xs[keep]] = colour


def render_keyframes(scene: Scene) -> np.ndarray:
    """(LATENT_FRAMES, LATENT_SIZE, LATENT_SIZE, 3) uint8 key frames (the animal over the object)."""
    frames = np.empty((LATENT_FRAMES, LATENT_SIZE, LATENT_SIZE, 3), np.uint8)
    frames[:] = SCENES[scene.scene]
    animal, obj = ANIMALS[scene.animal], OBJECTS[scene.obj]
    for frame, (ax, ay) in zip(frames, scene.key_positions()):
        _stamp(frame, obj.mask, obj.colour, *scene.object_xy)
        _stamp(frame, animal.mask, animal.colour, ax, ay)
    return frames


def frames_to_latents(keyframes: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 key frames -> (3, F, H, W) float32 latents in [-1, 1]."""
    return (keyframes.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2)


def decode(latents: np.ndarray) -> np.ndarray:
    """(3, F, h, w) latents -> (4(F-1)+1, 2h, 2w, 3) uint8 frames: the world's 'VAE decoder'."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[0] != 3:
        raise ValueError(f"world latents are (3, F, H, W) pixels, got shape {latents.shape}")
    keys = np.clip(np.rint((latents.transpose(1, 2, 3, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    index = -(-np.arange(decoded_frames(len(keys))) // VAE_SCALE_TEMPORAL)  # ceil(t / 4)
    return keys[index].repeat(SPATIAL_SCALE, axis=1).repeat(SPATIAL_SCALE, axis=2)


def render_latents(scene: Scene) -> np.ndarray:
    return frames_to_latents(render_keyframes(scene))
