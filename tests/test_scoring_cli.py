"""``python -m scoring``: store creation from the published CSVs, prompt encoding, evaluation
reports, fail-fast errors. Scoring itself runs through scoring.run with the fakes of
scoring_fakes.py (the CLI only adds model loading on top of it)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scoring.__main__ import main
from scoring.prompts import load_prompt_csv
from scoring.run import score_store, score_video_dir
from scoring.video import write_video
from scoring_fakes import ColorDetector, ColorTracker, FakeDecoder, fake_latents, render, trajectory
from spatialalign_jax.common.store import Status, Store, create_store

ROOT = Path(__file__).resolve().parents[1]
# The published prompt sets ship with the package (copies of ../shared/reference).
REF = ROOT / "scoring" / "reference"
EVAL120 = REF / "eval120.csv" if (REF / "eval120.csv").is_file() else None
T = 24


def _write_csv(path, rows, with_group=True):
    cols = (["group"] if with_group else []) + ["type", "prompt_id", "scene", "initial_SR", "final_SR", "animal", "object", "prompt"]
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(f'"{r.get(c, "")}"' for c in cols))
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(types):
    return [{"group": str(i), "type": t, "prompt_id": f"{i}_{t}", "scene": "In a park", "initial_SR": "a",
             "final_SR": "b", "animal": "cat", "object": "box", "prompt": f"In a park, a cat moves {i}."}
            for i, t in enumerate(types)]


@pytest.mark.parametrize("name,n,has_group", [("eval120.csv", 120, True), ("eval30.csv", 30, False)])
def test_create_store_from_published_csvs(tmp_path, name, n, has_group):
    csv = REF / name
    rc = main(["create-store", "--store", str(tmp_path / "s"), "--csv", str(csv), "--latent-shape", "4,3,4,4",
               "--text-dim", "8", "--max-text-len", "16"])
    assert rc == 0
    st = Store.open(tmp_path / "s")
    assert st.num_prompts == n and st.samples_per_prompt == 5 and st.latent_shape == (4, 3, 4, 4)
    assert st.num_frames == 9  # what the Wan VAE decodes 3 latent frames to
    assert {r["type"] for r in st.prompts} == {"LR", "RL", "LT", "TL", "RT", "TR"}
    assert all(r["split"] == "test" for r in st.prompts)
    assert ("group" in st.prompts[0]) == has_group
    assert all(r["prompt"].endswith(".") and r["animal"] and r["object"] for r in st.prompts)


def test_bad_csv_is_a_clear_error(tmp_path, capsys):
    rows = _rows(["LR", "XY"])
    csv = _write_csv(tmp_path / "p.csv", rows)
    rc = main(["create-store", "--store", str(tmp_path / "s"), "--csv", str(csv), "--text-dim", "8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "p.csv" in err and "row 2" in err and "'XY'" in err
    assert not (tmp_path / "s").exists()
    bad = tmp_path / "q.csv"
    bad.write_text("type,prompt_id,prompt\nLR,a,b\n")
    assert main(["create-store", "--store", str(tmp_path / "s"), "--csv", str(bad), "--text-dim", "8"]) == 2
    assert "lacks column(s) ['scene', 'initial_SR', 'final_SR', 'animal', 'object']" in capsys.readouterr().err
    rows = _rows(["LR", "RL"])
    rows[0]["prompt"] = "Un chat café,\nthen a cat moves."  # a quoted line break inside a field
    good = _write_csv(tmp_path / "good.csv", rows)
    latin1 = tmp_path / "latin1.csv"  # Excel's default "CSV" on many systems
    latin1.write_bytes(good.read_text(encoding="utf-8").encode("latin-1"))
    assert main(["create-store", "--store", str(tmp_path / "s"), "--csv", str(latin1), "--text-dim", "8"]) == 2
    assert "latin1.csv' is not UTF-8 text" in capsys.readouterr().err
    crlf = tmp_path / "crlf.csv"  # Windows line ends; the quoted field keeps its own line break
    crlf.write_bytes(good.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert [r["prompt"] for r in load_prompt_csv(crlf)] == [r["prompt"].replace("\n", "\r\n") for r in rows]


def test_absent_model_folder_fails_fast(tmp_path, capsys):
    csv = _write_csv(tmp_path / "p.csv", _rows(["LR"]))
    st = create_store(tmp_path / "s", [dict(r, split="test") for r in _rows(["LR"])], samples_per_prompt=1,
                      latent_shape=(1, T, 3, 4), num_frames=T, text_dim=4)
    vids = tmp_path / "v"
    vids.mkdir()
    (vids / "0_LR_0.mp4").write_bytes(b"")
    missing = str(tmp_path / "no_such_model")
    cases = [
        ["score", "--store", str(st.path), "--vae", missing, "--detector", missing, "--tracker", missing],
        ["score", "--videos", str(vids), "--csv", str(csv), "--out", str(tmp_path / "o"), "--detector", missing,
         "--tracker", missing],
        ["encode-prompts", "--store", str(st.path), "--text-encoder", missing],
        ["evaluate", "--store", str(st.path), "--out", str(tmp_path / "r"), "--dinov2", missing],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "no_such_model" in err and "does not exist" in err, err
    assert main(["score", "--store", str(tmp_path / "nostore"), "--vae", missing, "--detector", missing,
                 "--tracker", missing]) == 2
    assert "store.json is missing" in capsys.readouterr().err


def test_evaluate_store_report(tmp_path, capsys):
    types = ["LR", "LT", "TR"]
    st = create_store(tmp_path / "s", [dict(r, split="test") for r in _rows(types)], samples_per_prompt=2,
                      latent_shape=(1, T, 3, 4), num_frames=T, text_dim=4)
    for p, t in enumerate(types):
        a, o = trajectory(t, T)
        st.write_latents(p, 0, fake_latents(a, o), seed=0)
        stay = a.copy()
        stay[:] = a[0]  # never moves: DSR 0.5 for LR, (1 + 0 + 0 + 0) / 8 + 0.5 for mixed types
        st.write_latents(p, 1, fake_latents(stay, o), seed=1)
    score_store(st, ColorDetector(), ColorTracker(), FakeDecoder(), shard=(0, 1), progress=False)
    st.write_score(2, 1, status=Status.UNREADABLE_VIDEO)  # a failure stays in the denominator
    out = tmp_path / "report"
    assert main(["evaluate", "--store", str(st.path), "--out", str(out), "--label", "fake", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Correctness@0.7 = 50.0% over 6 samples" in printed and "fake" in printed
    report = json.loads((out / "report.json").read_text())
    d = report["dsr"]
    # DSRs: 1.0, 0.5 (LR); 0.875, 0.625 (LT); 0.875, failed (TR).
    assert d["num_samples"] == 6 and d["num_unscored"] == 0
    assert d["correctness_curve"]["0.0"] == pytest.approx(5 / 6)
    assert d["correctness_curve"]["0.6"] == pytest.approx(4 / 6)
    assert d["correctness@0.7"] == pytest.approx(3 / 6)
    assert d["correctness_curve"]["0.9"] == pytest.approx(1 / 6)
    assert d["correctness@0.7_by_type"] == {"LR": 0.5, "LT": 0.5, "TR": 0.5}
    assert d["status_counts"] == {"VALID": 5, "UNREADABLE_VIDEO": 1}
    assert "skipped" in report["quality"]
    assert [s["dsr"] for s in report["samples"]] == pytest.approx([1.0, 0.5, 0.875, 0.625, 0.875, None])
    assert (out / "correctness.png").read_bytes()[:4] == b"\x89PNG"
    assert "0.7" in (out / "correctness.txt").read_text()
    # A rescore that stopped after reset_score's first write: the old score is still there, but the
    # sample is unscored and counts as not correct.
    st._arrays["status"][0, 0].write(np.int8(Status.UNSCORED)).result()
    assert main(["evaluate", "--store", str(st.path), "--out", str(out), "--no-progress"]) == 0
    d = json.loads((out / "report.json").read_text())["dsr"]
    assert d["num_unscored"] == 1 and d["correctness@0.7"] == pytest.approx(2 / 6)


def test_cli_usage_errors(tmp_path, capsys):
    st = create_store(tmp_path / "s", [dict(r, split="test") for r in _rows(["LR"])], samples_per_prompt=1,
                      latent_shape=(1, T, 3, 4), num_frames=T, text_dim=4)
    for argv, message in [(["score", "--store", str(st.path), "--shard", "4/4"], "0 <= i < n"),
                          (["score", "--store", str(st.path), "--shard", "0-4"], "i/n"),
                          (["score", "--store", str(st.path), "--batch-size", "0"], "whole number >= 1"),
                          (["create-store", "--store", str(tmp_path / "n"), "--samples-per-prompt", "0"],
                           "whole number >= 1")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err, argv
    assert main(["evaluate", "--store", str(st.path), "--split", "train", "--out", str(tmp_path / "r")]) == 2
    assert "no prompts of split 'train'" in capsys.readouterr().err
    vids, csv = tmp_path / "v", _write_csv(tmp_path / "p.csv", _rows(["LR"]))
    vids.mkdir()
    assert main(["evaluate", "--videos", str(vids), "--csv", str(csv), "--out", str(tmp_path / "r")]) == 2
    assert "{prompt_id}_{seed}.mp4" in capsys.readouterr().err
    # Nothing scored yet: an error, not a 0% headline.
    assert main(["evaluate", "--store", str(st.path), "--out", str(tmp_path / "r")]) == 2
    assert "none of the 1 samples is scored yet" in capsys.readouterr().err
    # Folders that are files, a missing --mp4-dir, a device torch does not know: said before any work.
    (tmp_path / "afile").write_text("")
    for argv, message in [(["evaluate", "--store", str(st.path), "--out", str(tmp_path / "afile" / "r")],
                           "--out '%s' must be a folder, but '%s' is a file" % (tmp_path / "afile" / "r", tmp_path / "afile")),
                          (["create-store", "--store", str(tmp_path / "afile"), "--csv", str(csv), "--text-dim", "4"],
                           "--store '%s' must be a folder" % (tmp_path / "afile")),
                          (["evaluate", "--store", str(st.path), "--out", str(tmp_path / "r"), "--mp4-dir",
                            str(tmp_path / "nomp4"), "--clip", str(tmp_path)], "--mp4-dir '%s' does not exist" % (tmp_path / "nomp4"))]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    (tmp_path / "upper").mkdir()
    (tmp_path / "upper" / "0_LR_0.MP4").write_bytes(b"")
    assert main(["score", "--videos", str(tmp_path / "upper"), "--csv", str(csv), "--out", str(tmp_path / "o"),
                 "--detector", "d", "--tracker", "t"]) == 2
    assert "holds no *.mp4 files" in capsys.readouterr().err
    (tmp_path / "mp4").mkdir()
    assert main(["evaluate", "--store", str(st.path), "--out", str(tmp_path / "r"), "--mp4-dir", str(tmp_path / "mp4"),
                 "--clip", str(tmp_path), "--device", "gpu"]) == 2
    assert "--device 'gpu': expected cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["create-store", "--store", str(tmp_path / "n"), "--csv", str(csv), "--latent-shape", "16"]) == 2
    assert "--latent-shape must be 4 numbers" in capsys.readouterr().err


def test_evaluate_video_folder_with_fake_quality(tmp_path, capsys):
    """The video-folder path end to end, with quality metrics as plain callables (the seam the CLI
    fills with DINOv2 and CLIP)."""
    from scoring.evaluate import evaluate_samples, video_dir_samples

    rows = [dict(r, split="test") for r in _rows(["RL", "TL"])]
    vids = tmp_path / "v"
    for p, t in enumerate(["RL", "TL"]):
        write_video(vids / f"{p}_{t}_3.mp4", render(*trajectory(t, T)))
    write_video(vids / "stray.mp4", render(*trajectory("LR", T)))
    (vids / "1_TL_4.mp4").write_bytes(b"not a video")
    csv = _write_csv(tmp_path / "p.csv", rows)
    out = tmp_path / "o"
    score_video_dir(vids, rows, out, ColorDetector(), ColorTracker(), num_frames=T, progress=False)
    # CLI evaluate without models reads the saved scores.
    assert main(["evaluate", "--videos", str(vids), "--csv", str(csv), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    # The stray file is not a sample of the prompt table; prompt 0 lacks its seed-4 video, which
    # still counts (as unscored): 4 samples, 2 of them correct.
    assert report["dsr"]["num_samples"] == 4 and report["dsr"]["num_unscored"] == 1
    assert report["dsr"]["correctness@0.7"] == pytest.approx(2 / 4)
    assert report["notes"]["videos_without_prompt_row"] == ["stray.mp4"]
    assert report["notes"]["missing_videos"] == [f"{rows[0]['prompt_id']}_4.mp4"]
    samples, _ = video_dir_samples(vids, rows, out, num_frames=T)
    seen = []

    def fake_id(frames, boxes):
        seen.append(frames.shape)
        return float(np.isfinite(boxes).all(axis=1).mean())

    rep = evaluate_samples(samples, tmp_path / "q", label="q", source={}, progress=False,
                           quality={"id_consistency": fake_id, "clip_iqa_natural": lambda f, b: f.mean() / 255})
    assert rep["quality"]["id_consistency"] == {"mean": 1.0, "num_samples": 2}
    assert rep["quality"]["clip_iqa_natural"]["num_samples"] == 2 and rep["quality"]["errors"] == 0
    assert seen == [(T, 96, 128, 3)] * 2  # the unreadable video was skipped, not loaded
    # The means are printed and written under the curve, not only in report.json.
    clip_mean = rep["quality"]["clip_iqa_natural"]["mean"]
    for text in (capsys.readouterr().out, (tmp_path / "q" / "correctness.txt").read_text()):
        assert "id_consistency: 1.0000 over 2 videos" in text and f"clip_iqa_natural: {clip_mean:.4f}" in text


def test_encode_prompts_tiny_umt5(tmp_path, capsys):
    import tiny_scoring_models
    from scoring.text_encoder import UMT5TextEncoder

    enc_dir = tiny_scoring_models.umt5(tmp_path / "umt5")
    rows = _rows(["LR", "TL", "RT"])
    csv = _write_csv(tmp_path / "p.csv", rows, with_group=False)
    neg = tmp_path / "neg.txt"
    neg.write_text("static, blurred\n")
    store = tmp_path / "s"
    argv = ["encode-prompts", "--store", str(store), "--text-encoder", str(enc_dir), "--csv", str(csv),
            "--latent-shape", "1,2,3,4", "--num-frames", "5", "--max-text-len", "16", "--negative-prompt-file",
            str(neg), "--device", "cpu", "--no-progress", "--batch-size", "2"]
    assert main(argv) == 0
    st = Store.open(store)
    assert st.text_dim == 32 and st.samples_per_prompt == 5
    ref = UMT5TextEncoder(enc_dir, device="cpu", max_sequence_length=16)
    expected = ref.encode([r["prompt"] for r in rows] + ["static, blurred"])
    for p in range(3):
        got = st.read_text_embedding(p)
        assert got.shape == expected[p].shape and got.shape[0] > 1
        np.testing.assert_allclose(got, expected[p], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.read_negative_text_embedding(), expected[3], rtol=1e-5, atol=1e-6)
    # Re-running skips what is encoded; the default negative prompt file ships with the package.
    assert main(argv) == 0
    assert "encoded 0 prompts (skipped 3" in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    csv = _write_csv(tmp_path / "p.csv", _rows(["LR"]))
    r = subprocess.run([sys.executable, "-m", "scoring", "create-store", "--store", str(tmp_path / "s"), "--csv",
                        str(csv), "--text-dim", "8", "--latent-shape", "1,1,1,1", "--num-frames", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "created Store(" in r.stdout
    assert Store.open(tmp_path / "s").num_prompts == 1


def test_half_on_cpu_warns_once_per_command(caplog):
    import argparse
    import logging

    import torch

    from scoring import __main__ as cli

    args = argparse.Namespace(device="cpu", half=True)
    with caplog.at_level(logging.WARNING):
        first = cli._device_and_dtype(args)
        second = cli._device_and_dtype(args)  # evaluate asks for the VAE and again for the quality models
    assert first == second == ("cpu", torch.float32)
    assert sum("--half is ignored" in r.message for r in caplog.records) == 1
