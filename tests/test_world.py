"""The synthetic world: its videos score as designed under SPEC's real DSR-Score and validity rules,
its colour detector and tracker find the sprites where they were drawn, and its test prompts are
held out from training."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from scoring.dsr import dsr_score
from scoring.validity import FrameKind, boxes_for_video, classify_frame
from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.store_layout import Status, decoded_frames
from spatialalign_jax.world import render
from spatialalign_jax.world.detector import ColourDetector, ColourTracker, frame_detections
from spatialalign_jax.world.prompts import all_rows, split_rows, held_out_triples
from spatialalign_jax.world.vocab import ANIMALS, OBJECTS, SCENES

S = render.SPATIAL_SCALE


def _row(dsr_type="LR", animal="fox", obj="stump", scene="In a dark forest"):
    return {"type": dsr_type, "animal": animal, "object": obj, "scene": scene}


def _score(row, scene):
    frames = render.decode(render.render_latents(scene))
    a, o, status = boxes_for_video(frames, row["animal"], row["object"], ColourDetector(), ColourTracker())
    return (dsr_score(a, o, row["type"]) if status == Status.VALID else float("nan")), status


def test_decode_makes_the_stores_frame_count():
    x = render.render_latents(render.random_scene(np.random.default_rng(0), _row()))
    assert x.shape == render.LATENT_SHAPE and x.min() >= -1 and x.max() <= 1
    frames = render.decode(x)
    assert frames.shape == (decoded_frames(render.LATENT_FRAMES), render.FRAME_SIZE, render.FRAME_SIZE, 3) == (21, 32, 32, 3)
    # frame 0 is key frame 0, frames 1-4 key frame 1, ... (the Wan VAE's causal 4x), each pixel 2x2
    keys = render.render_keyframes(render.random_scene(np.random.default_rng(0), _row()))
    np.testing.assert_array_equal(frames[0], keys[0].repeat(S, 0).repeat(S, 1))
    np.testing.assert_array_equal(frames[17], keys[5].repeat(S, 0).repeat(S, 1))
    with pytest.raises(ValueError, match=r"\(3, F, H, W\)"):
        render.decode(np.zeros((4, 6, 16, 16)))


@pytest.mark.parametrize("dsr_type", list(DSR_TYPES))
def test_motions_score_as_designed(dsr_type):
    """Following the prompt scores the DSR maximum (1 for L/R types, 0.875 with T); the reverse way
    and staying put stay below the 0.7 threshold, so the pretraining mixture is mediocre at DSR."""
    rng = np.random.default_rng(1)
    row = _row(dsr_type)
    best = 1.0 if "T" not in dsr_type else 0.875
    for _ in range(3):
        dsr, status = _score(row, render.random_scene(rng, row, "follow"))
        assert status == Status.VALID and dsr == pytest.approx(best, abs=0.01)
        for motion in ("reverse", "static"):
            dsr, status = _score(row, render.random_scene(rng, row, motion))
            assert status == Status.VALID and dsr < 0.7


def test_detector_finds_sprites_where_they_were_drawn():
    for animal, obj in itertools.product(ANIMALS, OBJECTS):
        scene = render.Scene("On a moonlit night", animal, obj, "L", "T", (8, 9), over_top=True)
        keys = render.render_keyframes(scene)
        positions = scene.key_positions()
        for k in (0, 3, 5):
            frame = keys[k].repeat(S, 0).repeat(S, 1)
            dets = {d.label: d.box for d in frame_detections(frame)}
            assert set(dets) == {animal, obj}
            for name, sprite, (cx, cy) in ((animal, ANIMALS[animal], positions[k]), (obj, OBJECTS[obj], (8, 9))):
                h, w = sprite.mask.shape
                x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
                ys, xs = np.nonzero(sprite.mask)
                want = [S * (x0 + xs.min()), S * (y0 + ys.min()), S * (x0 + xs.max()) + S - 1, S * (y0 + ys.max()) + S - 1]
                np.testing.assert_array_equal(dets[name], want)


def test_wrong_animal_is_a_wrong_label_and_noise_is_no_detection():
    scene = render.Scene("In a dim cave", "frog", "rock", "L", "R", (8, 8), over_top=False)
    frames = render.decode(render.render_latents(scene))
    dets = ColourDetector().detect(frames, "fox", "rock")
    assert classify_frame(dets[0], "fox", "rock") is FrameKind.REDUNDANT
    assert classify_frame(ColourDetector().detect(frames, "frog", "rock")[0], "frog", "rock") is FrameKind.VALID
    _, _, status = boxes_for_video(frames, "fox", "rock", ColourDetector(), ColourTracker())
    assert status == Status.TOO_MANY_REDUNDANT_FRAMES
    speckled = frames.copy()
    speckled[:, 0, 0] = ANIMALS["cat"].colour  # one stray pixel of another animal's colour
    assert classify_frame(ColourDetector().detect(speckled, "frog", "rock")[0], "frog", "rock") is FrameKind.VALID
    # the box threshold on the share of the sprite drawn: half a frog is a frog, a quarter is not
    frame = frames[0].copy()
    box = next(d.box for d in frame_detections(frame) if d.label == "frog").astype(int)
    x0, y0, x1, y1 = box
    half = frame.copy()
    half[y0:(y0 + y1) // 2 + 1, x0:x1 + 1] = SCENES["In a dim cave"]
    frog = [d for d in frame_detections(half) if d.label == "frog"]
    assert len(frog) == 1 and 0.4 <= frog[0].score < 1
    quarter = frame.copy()
    quarter[y0:y1 + 1, x0:x1 + 1] = SCENES["In a dim cave"]
    quarter[y0:y0 + 2, x0:x0 + 4] = ANIMALS["frog"].colour  # 8 of the frog's 28 px
    assert "frog" not in {d.label for d in frame_detections(quarter)}
    with pytest.raises(ValueError, match="not in the synthetic world"):
        ColourDetector().detect(frames, "dog", "rock")


def test_tracker_follows_the_seed_colour_and_loses_a_vanished_sprite():
    scene = render.Scene("On a dusty plain", "cat", "barrel", "R", "L", (8, 8), over_top=True)
    frames = render.decode(render.render_latents(scene))
    dets = {d.label: d.box for d in frame_detections(frames[0])}
    frames[10:12] = SCENES["On a dusty plain"]  # the cat and the barrel vanish for two frames
    tracks = ColourTracker().track(frames, 0, {"animal": dets["cat"], "object": dets["barrel"]})
    assert np.isnan(tracks["animal"][10:12]).all() and np.isfinite(tracks["animal"][12:]).all()
    np.testing.assert_array_equal(tracks["object"][0], dets["barrel"])
    centres = (tracks["animal"][:, 0] + tracks["animal"][:, 2]) / 2
    assert centres[0] > 16 > centres[-1]  # right of the barrel, then left of it


def test_split_holds_test_prompts_and_triples_out():
    train, test = split_rows(48, 48, seed=3)
    held = held_out_triples()
    assert len(held) == 24
    assert not {(r["animal"], r["object"], r["type"]) for r in train} & held
    assert {(r["animal"], r["object"], r["type"]) for r in test} <= held
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for rows in (train, test):
        counts = {t: sum(r["type"] == t for r in rows) for t in DSR_TYPES}
        assert set(counts.values()) == {8}
    assert split_rows(48, 48, seed=3) == (train, test)  # deterministic
    assert len(all_rows()) == 4 * 4 * 4 * 6 * 5 and len({r["prompt"] for r in all_rows()}) == 1920
    with pytest.raises(ValueError, match="multiples of 6"):
        split_rows(10, 12)


def test_pretraining_motion_is_read_off_the_noise():
    """world.coupling: the share that follows is `follow`, the noise alone stays N(0, 1), and the choice is
    the noise's side of the follow-vs-static direction (so equal noise gives equal motion)."""
    from spatialalign_jax.world.coupling import coupled_video, follow_threshold

    rng = np.random.default_rng(0)
    rows = all_rows()
    moved, noise_values = [], []
    for i in rng.integers(len(rows), size=2000):
        x, eps, scene = coupled_video(rng, rows[i], 0.25)
        assert x.shape == eps.shape == render.LATENT_SHAPE
        np.testing.assert_array_equal(x, render.render_latents(scene))
        follow = dataclasses.replace(scene, final=render.random_scene(rng, rows[i]).final)
        d = (render.render_latents(follow) - render.render_latents(dataclasses.replace(scene, final=scene.initial))).ravel()
        moved.append(scene.initial != scene.final)
        assert moved[-1] == (eps.ravel() @ d / np.linalg.norm(d) > follow_threshold(0.25))
        noise_values.append(eps.ravel()[:50])
    assert abs(np.mean(moved) - 0.25) < 0.03
    v = np.concatenate(noise_values)
    assert abs(v.mean()) < 0.01 and abs(v.std() - 1) < 0.01
    assert follow_threshold(0.0) == np.inf and follow_threshold(1.0) == -np.inf
    with pytest.raises(ValueError, match="follow"):
        follow_threshold(1.5)
