"""Scoring runs with the deterministic fake detector/tracker/decoder of scoring_fakes.py.

Synthetic videos with known boxes go through the real orchestration, validity rules and DSR code.
"""

import json
import multiprocessing as mp

import numpy as np
import pytest

from scoring.dsr import dsr_score
from scoring.run import score_store, score_video_dir
from scoring.video_results import load_video_results, record_boxes
from spatialalign_jax.common.store import parse_shard
from scoring.video import write_video
from scoring_fakes import (
    MODE_DROP_FRAME,
    MODE_RAISE,
    TOP,
    ColorDetector,
    ColorTracker,
    FakeDecoder,
    fake_latents,
    render,
    trajectory,
)
from spatialalign_jax.common.store import Status, Store, create_store

T = 24
TYPES = ["LR", "RL", "LT", "TL", "RT", "TR"]
IDEAL = {"LR": 1.0, "RL": 1.0, "LT": 0.875, "TL": 0.875, "RT": 0.875, "TR": 0.875}


def _rows(types, split="test"):
    return [
        {"type": t, "prompt_id": f"{i}_{t}", "scene": "In a park", "initial_SR": "x", "final_SR": "y",
         "animal": "cat", "object": "box", "prompt": f"prompt {i}", "split": split}
        for i, t in enumerate(types)
    ]


def _sample_boxes(p, s, dsr_type):
    """Per (prompt, sample): sample 0 ideal, sample 1 a shifted partial motion, sample 2 special."""
    a, o = trajectory(dsr_type, T)
    if s == 1:
        # Stop halfway: the last frames sit over the object's corner region, not at the final SSR.
        a = a.copy()
        a[T // 2 :] = a[T // 2 - 1]
    return a, o


def _make_store(path, types=TYPES, special=True):
    st = create_store(path, _rows(types), samples_per_prompt=3, latent_shape=(1, T, 3, 4), num_frames=T, text_dim=4)
    for p, t in enumerate(types):
        for s in range(3):
            a, o = _sample_boxes(p, s, t)
            mode = 0
            if s == 2 and special:
                if p == 0:
                    mode = MODE_RAISE  # VAE error
                elif p == 1:
                    mode = MODE_DROP_FRAME  # wrong frame count
                elif p == 2:
                    o = o.copy()
                    o[5:] = np.nan  # object vanishes: too few valid frames
            st.write_latents(p, s, fake_latents(a, o, mode), seed=100 + s)
    return st


def _run_shard(path, shard):
    store = Store.open(path, mode="r+")
    score_store(store, ColorDetector(), ColorTracker(), FakeDecoder(), shard=shard, progress=False)


def test_store_scores_match_known_boxes(tmp_path):
    st = _make_store(tmp_path / "s")
    summary = score_store(st, ColorDetector(), ColorTracker(), FakeDecoder(), progress=False)
    ro = Store.open(tmp_path / "s")
    dsr, status = ro.read_dsr(), ro.read_status()
    for p, t in enumerate(TYPES):
        # Ideal motions reach the SPEC's ceilings: 1.0 for LR/RL, 0.875 for mixed types.
        assert status[p, 0] == Status.VALID and dsr[p, 0] == pytest.approx(IDEAL[t], abs=1e-6), t
        a, o = _sample_boxes(p, 1, t)
        assert status[p, 1] == Status.VALID
        assert dsr[p, 1] == pytest.approx(dsr_score(a, o, t), abs=1e-6)
        assert dsr[p, 1] < IDEAL[t] - 0.05
        sc = ro.read_score(p, 0)
        np.testing.assert_array_equal(sc.boxes_animal, trajectory(t, T)[0])
    assert status[0, 2] == Status.MODEL_ERROR
    assert status[1, 2] == Status.WRONG_FRAME_COUNT
    assert status[2, 2] == Status.TOO_FEW_VALID_FRAMES
    assert (status[3:, 2] == Status.VALID).all()
    assert np.isnan(dsr[:3, 2]).all()
    assert summary.scored == {"VALID": 15, "MODEL_ERROR": 1, "WRONG_FRAME_COUNT": 1, "TOO_FEW_VALID_FRAMES": 1}


def test_store_resume_and_retry(tmp_path):
    st = _make_store(tmp_path / "s")
    det = ColorDetector()
    score_store(st, det, ColorTracker(), FakeDecoder(), shard=(0, 2), progress=False)
    assert det.calls == 3 * 3 - 1  # prompts 0, 2, 4; the VAE error never reaches the detector
    status = Store.open(tmp_path / "s").read_status()
    assert (status[0::2] != Status.UNSCORED).all() and (status[1::2] == Status.UNSCORED).all()
    # Second run over everything: only the other shard's prompts are scored.
    det2 = ColorDetector()
    summary = score_store(st, det2, ColorTracker(), FakeDecoder(), progress=False)
    assert summary.skipped_done == 9 and sum(summary.scored.values()) == 9 and det2.calls == 8
    det3 = ColorDetector()
    summary = score_store(st, det3, ColorTracker(), FakeDecoder(), progress=False)
    assert summary.skipped_done == 18 and det3.calls == 0
    # retry_failed re-runs only the failures (still failing here: the fake VAE always raises).
    summary = score_store(st, ColorDetector(), ColorTracker(), FakeDecoder(), retry_failed=True, progress=False)
    assert summary.scored == {"MODEL_ERROR": 1, "WRONG_FRAME_COUNT": 1}


def test_store_tracker_error_and_missing_latents(tmp_path):
    st = create_store(tmp_path / "s", _rows(["LR", "TL"]), samples_per_prompt=2, latent_shape=(1, T, 3, 4),
                      num_frames=T, text_dim=4)
    for p, t in enumerate(["LR", "TL"]):
        st.write_latents(p, 0, fake_latents(*trajectory(t, T)), seed=0)

    class Exploding(ColorTracker):
        def track(self, frames, start_frame, boxes):
            raise RuntimeError("CUDA out of memory (simulated)")

    summary = score_store(st, ColorDetector(), Exploding(), FakeDecoder(), progress=False)
    assert summary.skipped_no_latents == 2 and summary.scored == {"MODEL_ERROR": 2}
    assert (Store.open(tmp_path / "s").read_status()[:, 1] == Status.UNSCORED).all()


def test_a_broken_device_or_repeated_model_errors_stop_the_run(tmp_path):
    """A CUDA error records its video as MODEL_ERROR and stops at once; a model error that repeats on
    MAX_CONSECUTIVE_MODEL_ERRORS videos in a row stops the run instead of failing the whole shard."""
    from scoring.run import MAX_CONSECUTIVE_MODEL_ERRORS, ScoringAborted

    types = ["LR", "TL"] * MAX_CONSECUTIVE_MODEL_ERRORS
    st = create_store(tmp_path / "s", _rows(types), samples_per_prompt=1, latent_shape=(1, T, 3, 4),
                      num_frames=T, text_dim=4)
    for p, t in enumerate(types):
        st.write_latents(p, 0, fake_latents(*trajectory(t, T)), seed=0)

    class DeviceLost(ColorTracker):
        calls = 0

        def track(self, frames, start_frame, boxes):
            DeviceLost.calls += 1
            if DeviceLost.calls == 3:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().track(frames, start_frame, boxes)

    with pytest.raises(ScoringAborted, match=r"(?s)illegal memory access.*recorded as MODEL_ERROR.*--retry-failed"):
        score_store(st, ColorDetector(), DeviceLost(), FakeDecoder(), progress=False)
    status = Store.open(tmp_path / "s").read_status()[:, 0]
    assert (status[:2] == Status.VALID).all() and status[2] == Status.MODEL_ERROR
    assert (status[3:] == Status.UNSCORED).all()

    class Broken(ColorTracker):
        def track(self, frames, start_frame, boxes):
            raise ValueError("bad config")

    # Invalid videos (no tracking) between the failures neither reset nor add to the count.
    st.write_latents(4, 0, fake_latents(*trajectory("LR", T), MODE_DROP_FRAME), seed=0)
    with pytest.raises(ScoringAborted, match=rf"{MAX_CONSECUTIVE_MODEL_ERRORS} videos failed.*--retry-failed"):
        score_store(st, ColorDetector(), Broken(), FakeDecoder(), progress=False)
    status = Store.open(tmp_path / "s").read_status()[:, 0]
    assert status[4] == Status.WRONG_FRAME_COUNT
    assert (status == Status.MODEL_ERROR).sum() == 1 + MAX_CONSECUTIVE_MODEL_ERRORS
    assert (status == Status.UNSCORED).sum() == len(types) - 4 - MAX_CONSECUTIVE_MODEL_ERRORS
    # Fixed: the retry scores everything (the short video fails again, as it must).
    summary = score_store(st, ColorDetector(), ColorTracker(), FakeDecoder(), retry_failed=True, progress=False)
    assert summary.scored == {"VALID": len(types) - 3, "WRONG_FRAME_COUNT": 1}


def test_three_concurrent_shards_equal_one_run(tmp_path):
    _make_store(tmp_path / "one")
    _run_shard(tmp_path / "one", (0, 1))
    _make_store(tmp_path / "many")
    ctx = mp.get_context("spawn")  # TensorStore must not run in forked children
    procs = [ctx.Process(target=_run_shard, args=(tmp_path / "many", (i, 3))) for i in range(3)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(300)
        assert pr.exitcode == 0
    one, many = Store.open(tmp_path / "one"), Store.open(tmp_path / "many")
    assert (one.read_status() != Status.UNSCORED).all()
    for name in ("status", "dsr", "boxes_animal", "boxes_object"):
        np.testing.assert_array_equal(one.array(name).read().result(), many.array(name).read().result(), err_msg=name)


def test_inspection_outputs(tmp_path):
    st = _make_store(tmp_path / "s", types=["LT"], special=False)
    score_store(st, ColorDetector(), ColorTracker(), FakeDecoder(), mp4_dir=tmp_path / "mp4",
                plots_dir=tmp_path / "plots", progress=False)
    assert sorted(p.name for p in (tmp_path / "mp4").iterdir()) == ["0_LT_100.mp4", "0_LT_101.mp4", "0_LT_102.mp4"]
    pngs = sorted((tmp_path / "plots").iterdir())
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_video_folder(tmp_path):
    rows = _rows(["LR", "TR", "RT"])
    vids = tmp_path / "videos"
    for p, t in enumerate(["LR", "TR"]):
        for seed in (0, 1):
            a, o = trajectory(t, T)
            extra = None
            if seed == 1 and t == "TR":
                # A third, unprompted thing in 20 frames: more than 16 redundant frames.
                extra = np.full((T, 4), np.nan, np.float32)
                extra[:20] = (2, 80, 11, 89)
            write_video(vids / f"{p}_{t}_{seed}.mp4", render(a, o, extra))
    write_video(vids / "2_RT_0.mp4", render(*trajectory("RT", T))[:20])  # short: wrong frame count
    (vids / "2_RT_1.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)  # corrupt
    write_video(vids / "unknown_0.mp4", render(*trajectory("LR", T)))  # no such prompt
    out = tmp_path / "out"
    summary = score_video_dir(vids, rows, out, ColorDetector(), ColorTracker(), num_frames=T, progress=False)
    assert sum(summary.scored.values()) == 7
    res = load_video_results(out)
    assert res["0_LR_0"]["status_name"] == "VALID" and res["0_LR_0"]["dsr"] == pytest.approx(1.0, abs=1e-6)
    assert res["1_TR_0"]["dsr"] == pytest.approx(0.875, abs=1e-6) and res["1_TR_0"]["seed"] == 0
    assert res["1_TR_1"]["status_name"] == "TOO_MANY_REDUNDANT_FRAMES"
    assert res["2_RT_0"]["status_name"] == "WRONG_FRAME_COUNT" and "20 frames, expected 24" in res["2_RT_0"]["error"]
    assert res["2_RT_1"]["status_name"] == "UNREADABLE_VIDEO" and "2_RT_1.mp4" in res["2_RT_1"]["error"]
    assert res["unknown_0"]["status_name"] == "MISSING_PROMPT" and res["unknown_0"]["prompt_id"] is None
    boxes = json.loads((out / "scores" / "0_LR_0.json").read_text())["boxes_animal"]
    assert len(boxes) == T and boxes[0] == [20, 56, 35, 71]
    # An invalid video's boxes are all missing: strict JSON nulls, read back as NaN rows.
    invalid = json.loads((out / "scores" / "1_TR_1.json").read_text())
    assert invalid["boxes_animal"] == [[None] * 4] * T and invalid["dsr"] is None
    assert np.isnan(record_boxes(invalid, "boxes_object")).all() and record_boxes(invalid, "boxes_object").shape == (T, 4)
    # Resume: nothing left to do; sharding splits the work without overlap.
    det = ColorDetector()
    summary = score_video_dir(vids, rows, out, det, ColorTracker(), num_frames=T, progress=False)
    assert summary.skipped_done == 7 and det.calls == 0
    # A video replaced after scoring (a new checkpoint's sample under the same name): its old score no
    # longer counts, and the next run scores it again, alone.
    from scoring.evaluate import video_dir_samples

    a, o = trajectory("LR", T)
    write_video(vids / "0_LR_0.mp4", render(a[::-1].copy(), o))  # now it moves right to left
    samples, notes = video_dir_samples(vids, rows, out, num_frames=T)
    assert notes["videos_changed_since_scored"] == ["0_LR_0.mp4"]
    assert [s.status.name for s in samples if (s.prompt_id, s.seed) == (rows[0]["prompt_id"], 0)] == ["UNSCORED"]
    summary = score_video_dir(vids, rows, out, ColorDetector(), ColorTracker(), num_frames=T, progress=False)
    assert summary.skipped_done == 6 and sum(summary.scored.values()) == 1
    assert load_video_results(out)["0_LR_0"]["dsr"] < 0.5
    write_video(vids / "0_LR_0.mp4", render(a, o))  # put the original back for the comparisons below
    score_video_dir(vids, rows, out, ColorDetector(), ColorTracker(), num_frames=T, progress=False)
    res = load_video_results(out)
    out2 = tmp_path / "out2"
    n = [sum(score_video_dir(vids, rows, out2, ColorDetector(), ColorTracker(), num_frames=T, shard=(i, 2),
                             progress=False).scored.values()) for i in range(2)]
    assert sum(n) == 7 and min(n) > 0
    assert load_video_results(out2) == res


def test_parse_shard():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_top_position_is_above_object():
    # Guards the fixture: y points down, TOP must be above (smaller y) the object.
    assert TOP[3] < trajectory("LT", T)[1][0][1]


def test_video_folder_samples_count_missing_and_duplicate_videos(tmp_path):
    """Every prompt owes as many samples as the fullest prompt has (SPEC 3: Correctness@tau divides by
    all samples): a missing video is an unscored sample, a second file for one (prompt, seed) is not."""
    from scoring.evaluate import video_dir_samples

    rows = [{"prompt_id": pid, "type": "LR"} for pid in ("A", "B", "C")]
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("A_0", "A_1", "B", "B_0"):  # B.mp4 and B_0.mp4 are both (B, seed 0)
        (shared / f"{name}.mp4").touch()
    samples, notes = video_dir_samples(shared, rows, tmp_path / "out")
    assert [(s.prompt_id, s.seed, s.status.name) for s in samples] == [
        ("A", 0, "UNSCORED"), ("A", 1, "UNSCORED"), ("B", 0, "UNSCORED"), ("B", 1, "UNSCORED"),
        ("C", 0, "UNSCORED"), ("C", 1, "UNSCORED")]
    assert notes["missing_videos"] == ["B_1.mp4", "C_0.mp4", "C_1.mp4"]
    assert len(notes["duplicate_videos"]) == 1 and notes["prompts_without_videos"] == ["C"]
    own = tmp_path / "own"  # per-prompt seeds (a train split): the gap is counted, its seed unknown
    own.mkdir()
    for name in ("A_11", "A_12", "B_21", "C_31", "C_32"):
        (own / f"{name}.mp4").touch()
    samples, notes = video_dir_samples(own, rows, tmp_path / "out")
    assert len(samples) == 6 and notes["missing_videos"] == ["B_?.mp4"]
