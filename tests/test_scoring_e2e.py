"""``python -m scoring`` end to end with tiny random models saved to disk and loaded through the
same ``from_pretrained(folder)`` code users run: umT5 -> store, latents -> VAE -> Grounding DINO ->
(SAM 2) -> status and DSR into the store -> evaluation report. Random weights cannot find a cat,
so this checks the plumbing (every sample scored, no model error, outputs written), not scores;
scores are checked with the deterministic fakes in test_scoring_run.py."""

import json

import numpy as np
import pytest

import tiny_scoring_models as tiny
from scoring.__main__ import main
from scoring.video import read_video
from spatialalign_jax.common.store import Status, Store

pytestmark = pytest.mark.slow

CSV = """type,prompt_id,scene,initial_SR,final_SR,animal,object,prompt
LR,p_LR,In a park,on the left of,to the right of,cat,chair,"In a park, a cat is on the left of a chair, then the cat runs to the right of the chair."
TL,p_TL,In a room,on the top of,to the left of,dog,box,"In a room, a dog is on the top of a box, then the dog jumps to the left of the box."
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "umt5": tiny.umt5(root / "umt5"),
        "vae": tiny.wan_vae(root / "vae"),
        "gdino": tiny.grounding_dino(root / "gdino"),
        "sam2": tiny.sam2_video(root / "sam2"),
        "dinov2": tiny.dinov2(root / "dinov2"),
        "clip": tiny.clip(root / "clip"),
    }


def test_cli_end_to_end_with_tiny_models(models, tmp_path, capsys):
    csv = tmp_path / "prompts.csv"
    csv.write_text(CSV)
    store = tmp_path / "store"
    cpu = ["--device", "cpu", "--no-progress"]
    # Latents (4, 6, 8, 8) decode to 21 frames of 64 x 64: enough frames for a DSR-Score.
    assert main(["encode-prompts", "--store", str(store), "--text-encoder", str(models["umt5"]), "--csv", str(csv),
                 "--latent-shape", "4,6,8,8", "--num-frames", "21", "--samples-per-prompt", "1",
                 "--max-text-len", "32", *cpu]) == 0
    st = Store.open(store, mode="r+")
    assert (st.read_text_lengths() > 0).all() and st.read_negative_text_embedding().shape[0] > 0
    rng = np.random.default_rng(0)
    for p in range(2):
        st.write_latents(p, 0, rng.standard_normal((4, 6, 8, 8)).astype(np.float32), seed=p)

    mp4, plots = tmp_path / "mp4", tmp_path / "plots"
    argv = ["score", "--store", str(store), "--vae", str(models["vae"]), "--detector", str(models["gdino"]),
            "--tracker", str(models["sam2"]), "--mp4-dir", str(mp4), "--plots", str(plots), *cpu]
    assert main(argv) == 0
    assert "scored 2 videos" in capsys.readouterr().out
    status = Store.open(store).read_status()
    assert (status != Status.UNSCORED).all()
    assert not any(Status(int(s)).is_failure for s in status.ravel()), [Status(int(s)).name for s in status.ravel()]
    assert sorted(p.name for p in mp4.iterdir()) == ["p_LR_0.mp4", "p_TL_1.mp4"]
    assert read_video(mp4 / "p_LR_0.mp4", 21).shape == (21, 64, 64, 3)
    assert len(list(plots.iterdir())) == 2
    # Resumed: nothing left to score.
    assert main(argv) == 0
    assert "scored 0 videos" in capsys.readouterr().out

    out = tmp_path / "report"
    assert main(["evaluate", "--store", str(store), "--out", str(out), "--dinov2", str(models["dinov2"]),
                 "--clip", str(models["clip"]), "--mp4-dir", str(mp4), *cpu]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dsr"]["num_samples"] == 2 and report["dsr"]["num_unscored"] == 0
    q = report["quality"]
    # Invalid videos have no animal boxes, hence no ID consistency; CLIP-IQA scores every video.
    assert q["errors"] == 0 and q["id_consistency"]["num_samples"] == 0
    assert q["clip_iqa_natural"]["num_samples"] == 2 and 0.0 < q["clip_iqa_natural"]["mean"] < 1.0

    # A VAE that does not fit the store's latents is refused before anything is scored.
    from spatialalign_jax.common.store import create_store

    wrong = create_store(tmp_path / "wrong", [dict(r, split="test") for r in st.prompts], samples_per_prompt=1,
                         latent_shape=(5, 6, 8, 8), num_frames=21, text_dim=8)
    assert main(["score", "--store", str(wrong.path), "--vae", str(models["vae"]), "--detector",
                 str(models["gdino"]), "--tracker", str(models["sam2"]), *cpu]) == 2
    assert "decodes 4-channel latents" in capsys.readouterr().err

    # The same videos as a folder of mp4 files.
    res = tmp_path / "res"
    assert main(["score", "--videos", str(mp4), "--csv", str(csv), "--out", str(res), "--num-frames", "21",
                 "--detector", str(models["gdino"]), "--tracker", str(models["sam2"]), *cpu]) == 0
    recs = [json.loads(p.read_text()) for p in sorted((res / "scores").iterdir())]
    assert [r["prompt_id"] for r in recs] == ["p_LR", "p_TL"]
    assert all(not Status(r["status"]).is_failure and Status(r["status"]) != Status.UNSCORED for r in recs)
    # evaluate on the folder scores what is left (nothing here) and reports.
    capsys.readouterr()
    assert main(["evaluate", "--videos", str(mp4), "--csv", str(csv), "--out", str(res), "--num-frames", "21",
                 "--detector", str(models["gdino"]), "--tracker", str(models["sam2"]), *cpu]) == 0
    assert "scored 0 videos" in capsys.readouterr().out
    assert json.loads((res / "report.json").read_text())["dsr"]["num_samples"] == 2


def test_real_sam2_tracker_behind_the_fake_detector(models, tmp_path):
    """The tracking half with the real (tiny, random) SAM 2: the colour detector passes the
    validity rules, so the tracker is seeded and its boxes reach the DSR-Score."""
    from scoring.run import score_video_dir
    from scoring.track import make_tracker
    from scoring.video import write_video
    from scoring_fakes import ColorDetector, render, trajectory

    rows = [{"type": "LT", "prompt_id": "v_LT", "scene": "s", "initial_SR": "a", "final_SR": "b",
             "animal": "cat", "object": "box", "prompt": "p", "split": "test"}]
    write_video(tmp_path / "v" / "v_LT_0.mp4", render(*trajectory("LT", 20)))
    tracker = make_tracker("transformers", models["sam2"], device="cpu")
    summary = score_video_dir(tmp_path / "v", rows, tmp_path / "o", ColorDetector(), tracker, num_frames=20,
                              progress=False)
    rec = json.loads((tmp_path / "o" / "scores" / "v_LT_0.json").read_text())
    assert sum(summary.scored.values()) == 1
    # Random weights give arbitrary masks: either enough tracked frames (a DSR in [0, 1]) or too few.
    assert rec["status_name"] in ("VALID", "TOO_FEW_TRACKED_FRAMES"), rec["error"]
    assert len(rec["boxes_animal"]) == 20
    if rec["status_name"] == "VALID":
        assert 0.0 <= rec["dsr"] <= 1.0
