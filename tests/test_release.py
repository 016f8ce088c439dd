"""The SpatialAlign release's training data into a store (scoring.release): synthetic files of the release's
format (tiny shapes, torch.save) import into a store equal to them that the trainer's PairSampler pairs;
bad files are refused by name before anything is written; a stopped import resumes."""

import csv
import json

import numpy as np
import pytest
import torch

from scoring import release
from scoring.release import MARKER, ReleaseError, import_release, main, plan_release
from spatialalign_jax.common.dsr_types import DSR_TYPES, dsr_prompt
from spatialalign_jax.common.store import Status, Store

N, C, F, H, W = 4, 4, 3, 2, 4  # samples, latent channels, latent frames, height, width
L, D = 8, 6  # text rows (zero-padded, as DiffSynth's WanPrompter pads to 512) and features
PROMPTS = {  # prompt_id: (type, animal, object, rewards, true text length)
    "1043_TL": ("TL", "squirrel", "box", [0.9, 0.3, -100, 0.75], 5),
    "1046_LT": ("LT", "rabbit", "chair", [0.8, 0.85, -100, -100], 8),
    "1049_RT": ("RT", "cat", "pot", [0.1, 0.72, 0.2, 0.5], 3),
}
SCENE = "In a narrow hallway with a large window"


class NotATensor:
    """Pickled by reference: torch.load(weights_only=True) must refuse to import it."""


def _prompt(pid):
    t, animal, obj, _, _ = PROMPTS[pid]
    return dsr_prompt(SCENE, animal, obj, t, "jumps")


def _tensors(pid, seed, text_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(N, C, F, H, W, generator=g).to(torch.bfloat16)
    context = torch.zeros(1, L, D, dtype=text_dtype)
    context[0, :PROMPTS[pid][4]] = torch.randn(PROMPTS[pid][4], D, generator=g).to(text_dtype)
    return {"prompt_id": pid, "latents_data": latents, "prompt_emb": {"context": context}}


def _release(tmp_path, columns="full", text_dtype=torch.float32, videos=False):
    """A release folder: tensors/{pid}.tensors.pth and train_metadata.csv as calc_dsr_score.py writes it."""
    src = tmp_path / "release"
    (src / "tensors").mkdir(parents=True)
    data = {}
    for i, pid in enumerate(PROMPTS):
        data[pid] = _tensors(pid, i, text_dtype)
        torch.save(data[pid], src / "tensors" / f"{pid}.tensors.pth")
    with open(src / "train_metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        if columns == "full":
            w.writerow(["group", "type", "prompt_id", "scene", "initial_SR", "final_SR", "animal", "object", "prompt",
                        "video", "reward"])
        else:
            w.writerow(["prompt_id", "prompt", "video", "reward"] if columns == "prompt" else ["prompt_id", "reward"])
        for pid, (t, animal, obj, rewards, _) in PROMPTS.items():
            names = str([f"{pid}_F81_seed{10 + k:02d}.mp4" for k in range(N)]) if videos else "[]"
            reward = str(rewards)
            if columns == "full":
                ty = DSR_TYPES[t]
                w.writerow([pid.split("_")[0], t, pid, SCENE, ty.initial_phrase, ty.final_phrase, animal, obj,
                            _prompt(pid), names, reward])
            elif columns == "prompt":
                w.writerow([pid, _prompt(pid), names, reward])
            else:
                w.writerow([pid, reward])
    return src, data


def _check_store(store, data, seeds=None):
    assert store.num_prompts == 3 and store.samples_per_prompt == N and store.latent_shape == (C, F, H, W)
    assert store.num_frames == 4 * (F - 1) + 1 and store.text_dim == D and store.max_text_len == L
    for p, (pid, (t, animal, obj, rewards, n)) in enumerate(PROMPTS.items()):
        row = store.prompts[p]
        assert (row["prompt_id"], row["type"], row["animal"], row["object"], row["scene"], row["split"]) == (
            pid, t, animal, obj, SCENE, "train")
        assert row["prompt"] == _prompt(pid)
        emb = store.read_text_embedding(p)
        np.testing.assert_array_equal(emb, data[pid]["prompt_emb"]["context"][0, :n].float().numpy())
        for s in range(N):
            lat, seed = store.read_latents(p, s)
            np.testing.assert_array_equal(lat, data[pid]["latents_data"][s].float().numpy())
            assert seed == (s if seeds is None else seeds[s])
            score = store.read_score(p, s)
            assert np.isnan(score.boxes_animal).all() and np.isnan(score.boxes_object).all()
            if rewards[s] == -100:
                assert score.status == Status.TOO_FEW_TRACKED_FRAMES and score.status.is_invalid
                assert np.isnan(score.dsr)
            else:
                assert score.status == Status.VALID and score.dsr == pytest.approx(rewards[s], abs=0, rel=1e-7)


def test_import_equals_the_inputs_and_pairs_are_found(tmp_path, capsys):
    src, data = _release(tmp_path)
    assert main(["--src", str(src), "--store", str(tmp_path / "store")]) == 0
    assert "prompts hold a winner/loser pair" in capsys.readouterr().out
    store = Store.open(tmp_path / "store")
    _check_store(store, data)
    assert store.meta["text_dtype"] == "float32"
    assert json.loads((tmp_path / "store" / MARKER).read_text())["complete"] is True

    from spatialalign_jax.train.pairs import PairSampler

    sampler = PairSampler(tmp_path / "store", global_batch_size=2)
    table = sampler.table
    # 1043_TL: winners 0 (0.9), 3 (0.75) over loser 1 (0.3); 1046_LT: no valid loser; 1049_RT: winner 1 (0.72)
    assert table.prompts.tolist() == [0, 2]
    assert sorted(map(tuple, table.pairs[0].tolist())) == [(0, 1), (3, 1)]
    assert sorted(map(tuple, table.pairs[1].tolist())) == [(1, 0), (1, 2), (1, 3)]

    # a rerun finds it complete and leaves it alone
    assert main(["--src", str(src), "--store", str(tmp_path / "store")]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_columns_from_the_prompt_text_or_the_csv(tmp_path):
    src, data = _release(tmp_path, columns="prompt", text_dtype=torch.bfloat16, videos=True)
    store = import_release(src, tmp_path / "parsed", log=lambda _: None)
    _check_store(store, data, seeds=[10, 11, 12, 13])  # the video names' seeds
    assert store.meta["text_dtype"] == "bfloat16"  # the release's bf16 text, kept losslessly

    src2 = tmp_path / "bare"
    src2.mkdir()
    (src / "tensors").rename(src2 / "tensors")
    with open(src2 / "metadata.csv", "w", newline="") as f:  # run_train.sh's name; ids and rewards only
        w = csv.writer(f)
        w.writerow(["prompt_id", "reward"])
        for pid, v in PROMPTS.items():
            w.writerow([pid, str(v[3])])
    with pytest.raises(ReleaseError, match="pass the prompt table with --csv"):
        plan_release(src2)
    table = tmp_path / "prompts.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["type", "prompt_id", "scene", "initial_SR", "final_SR", "animal", "object", "prompt"])
        for pid, (t, animal, obj, _, _) in PROMPTS.items():
            w.writerow([t, pid, SCENE, DSR_TYPES[t].initial_phrase, DSR_TYPES[t].final_phrase, animal, obj,
                        _prompt(pid)])
    store = import_release(src2, tmp_path / "from_csv", csv_path=table, log=lambda _: None)
    _check_store(store, data)


def _refused(tmp_path, capsys, src, *names):
    assert main(["--src", str(src), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "nothing was written" in err
    for name in names:
        assert str(name) in err, err
    assert not (tmp_path / "store").exists()
    return err


def test_refusals_name_the_file(tmp_path, capsys):
    src, data = _release(tmp_path)
    tensors = src / "tensors"
    bad = tensors / "1043_TL.tensors.pth"

    d = dict(data["1043_TL"])
    d["latents"] = d.pop("latents_data")  # another layout's key
    torch.save(d, bad)
    _refused(tmp_path, capsys, src, bad, "lacks key(s) ['latents_data']")

    d = dict(data["1043_TL"], latents_data=torch.zeros(N, C, F, H, W + 2))  # another resolution
    torch.save(d, bad)
    _refused(tmp_path, capsys, src, bad, f"are {(C, F, H, W + 2)}, most files' are {(C, F, H, W)}")

    torch.save(dict(data["1043_TL"], latents_data=torch.zeros(C, F, H, W)), bad)  # one sample, unbatched
    _refused(tmp_path, capsys, src, bad, "expected a float tensor (N, C, F, H, W)")

    torch.save(dict(data["1043_TL"], extra=NotATensor()), bad)  # a pickle weights_only refuses
    _refused(tmp_path, capsys, src, bad, "weights_only=True) refuses it", "NotATensor")

    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    _refused(tmp_path, capsys, src, bad, "not a torch file")

    torch.save(data["1043_TL"], bad)
    torch.save(_tensors("1043_TL", 9), tensors / "9999_LR.tensors.pth")  # a file without a metadata row
    (tensors / "1049_RT.tensors.pth").unlink()  # a row without a file
    err = _refused(tmp_path, capsys, src, tensors / "9999_LR.tensors.pth", tensors / "1049_RT.tensors.pth",
                   "2 problem(s)")
    assert "no row of" in err and "put it there, or drop the row" in err


def test_reward_refusals_name_the_row(tmp_path, capsys):
    src, data = _release(tmp_path, columns="ids")
    meta = src / "train_metadata.csv"
    text = meta.read_text()
    meta.write_text(text.replace("[0.9, 0.3, -100, 0.75]", "[0.9, 0.3, -100]"))  # 3 rewards for 4 samples
    with pytest.raises(ReleaseError) as e:
        plan_release(src)
    assert "3 rewards for the 4 samples" in str(e.value) and "1043_TL.tensors.pth" in str(e.value)
    assert f"{meta} row 1 (1043_TL)" in str(e.value)
    meta.write_text(text.replace("[0.9, 0.3, -100, 0.75]", "[0.9, 1.5, -100, 0.75]"))
    with pytest.raises(ReleaseError, match=r"row 1 \(1043_TL\): reward 1.5 \(sample 1\) is neither"):
        plan_release(src)
    meta.write_text(text.replace("[0.9, 0.3, -100, 0.75]", "__import__('os')"))
    with pytest.raises(ReleaseError, match="is not a list of numbers"):
        plan_release(src)


def test_a_stopped_import_resumes(tmp_path, monkeypatch):
    src, data = _release(tmp_path)
    real = release.import_prompt
    calls = []

    def stop_at_the_second(store, p, entry):
        calls.append(p)
        if len(calls) == 2:
            store.write_latents(p, 0, np.zeros((C, F, H, W)), 0)  # half a prompt written, then killed
            raise KeyboardInterrupt
        real(store, p, entry)

    monkeypatch.setattr(release, "import_prompt", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        import_release(src, tmp_path / "store", log=lambda _: None)
    assert json.loads((tmp_path / "store" / MARKER).read_text())["complete"] is False
    monkeypatch.setattr(release, "import_prompt", real)

    resumed = []
    monkeypatch.setattr(release, "import_prompt", lambda s, p, e: (resumed.append(p), real(s, p, e)))
    logs = []
    import_release(src, tmp_path / "store", log=logs.append)
    assert resumed == [1, 2] and "resuming" in logs[0]
    _check_store(Store.open(tmp_path / "store"), data)

    # a store made from other files is not resumed into, nor is a folder that is no import
    meta = src / "train_metadata.csv"
    meta.write_text(meta.read_text().replace("0.75]", "0.7]"))
    with pytest.raises(ReleaseError, match="imported from other files"):
        import_release(src, tmp_path / "store", log=lambda _: None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(ReleaseError, match="no import of scoring.release"):
        import_release(src, tmp_path / "other", log=lambda _: None)
