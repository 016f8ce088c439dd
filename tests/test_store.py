"""The store (SPEC section 8): round trips, validation errors, concurrent writers."""

import json
import multiprocessing as mp
import shutil

import numpy as np
import pytest

from spatialalign_jax.common.store import (
    LAYOUT_VERSION,
    STATUS_DESCRIPTIONS,
    Status,
    Store,
    StoreError,
    create_store,
)

P, S, T, D, L = 4, 3, 6, 8, 16
LATENT = (2, 3, 4, 5)


def _prompts(n=P):
    return [
        {"type": "LR", "prompt_id": f"p{i}", "scene": "A field", "initial_SR": "on the left of",
         "final_SR": "to the right of", "animal": "cat", "object": "box", "prompt": f"prompt {i}",
         "split": "test", "group": i}
        for i in range(n)
    ]


def _create(path, **kw):
    args = dict(samples_per_prompt=S, latent_shape=LATENT, num_frames=T, text_dim=D, max_text_len=L)
    args.update(kw)
    return create_store(path, _prompts(), **args)


def _all_arrays(path):
    st = Store.open(path)
    return {name: np.asarray(st.array(name).read().result()) for name in st._arrays}


def test_create_and_open_metadata(tmp_path):
    st = _create(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta == {"layout_version": LAYOUT_VERSION, "num_prompts": P, "samples_per_prompt": S,
                    "latent_shape": list(LATENT), "num_frames": T, "text_dim": D, "max_text_len": L,
                    "text_dtype": "float32"}
    ro = Store.open(tmp_path / "s")
    assert ro.prompts[2]["prompt_id"] == "p2" and ro.prompts[2]["group"] == 2 and ro.prompts[2]["split"] == "test"
    assert ro.prompt_index("p3") == 3
    assert ro.latent_shape == LATENT and ro.num_frames == T
    # A fresh store is all-unscored, NaN DSR, no latents, no text.
    assert (ro.read_status() == Status.UNSCORED).all() and ro.read_status().shape == (P, S)
    assert np.isnan(ro.read_dsr()).all() and ro.read_dsr().dtype == np.float32
    assert (ro.read_seeds() == -1).all()
    assert (ro.read_text_lengths() == 0).all() and ro.read_text_embedding(0).shape == (0, D)
    with pytest.raises(StoreError, match="no latents"):
        ro.read_latents(0, 0)
    with pytest.raises(StoreError, match="read-only"):
        ro.write_score(0, 0, status=Status.MODEL_ERROR)
    del st


def test_round_trips(tmp_path):
    st = _create(tmp_path / "s")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5, D)).astype(np.float32)
    st.write_text_embedding(1, emb)
    neg = rng.standard_normal((L, D)).astype(np.float32)
    st.write_negative_text_embedding(neg)
    lat = rng.standard_normal(LATENT).astype(np.float32)
    st.write_latents(2, 1, lat, seed=1234)
    ba = rng.uniform(0, 100, (T, 4)).astype(np.float32)
    ba[3] = np.nan
    bo = rng.uniform(0, 100, (T, 4)).astype(np.float32)
    st.write_score(3, 2, status=Status.VALID, dsr=0.625, boxes_animal=ba, boxes_object=bo)
    st.write_score(0, 0, status=Status.NO_VALID_RUN, dsr=0.9)  # an invalid sample keeps NaN DSR

    ro = Store.open(tmp_path / "s")
    np.testing.assert_array_equal(ro.read_text_embedding(1), emb)
    padded = np.asarray(ro.array("text_emb")[1].read().result())
    assert (padded[5:] == 0).all()
    np.testing.assert_array_equal(ro.read_negative_text_embedding(), neg)
    got, seed = ro.read_latents(2, 1)
    np.testing.assert_array_equal(got, lat)
    assert seed == 1234 and ro.read_seeds()[2, 1] == 1234 and (ro.read_seeds() == -1).sum() == P * S - 1
    sc = ro.read_score(3, 2)
    assert sc.status is Status.VALID and sc.dsr == 0.625
    np.testing.assert_array_equal(sc.boxes_animal, ba)
    np.testing.assert_array_equal(sc.boxes_object, bo)
    sc0 = ro.read_score(0, 0)
    assert sc0.status is Status.NO_VALID_RUN and np.isnan(sc0.dsr) and np.isnan(sc0.boxes_animal).all()
    status, dsr = ro.read_status(), ro.read_dsr()
    assert status[3, 2] == Status.VALID and status[0, 0] == Status.NO_VALID_RUN and (status != 0).sum() == 2
    assert dsr[3, 2] == np.float32(0.625) and np.isfinite(dsr).sum() == 1
    a, o = ro.read_boxes([3])
    np.testing.assert_array_equal(a[0, 2], ba)
    st.reset_score(3, 2)
    assert Store.open(tmp_path / "s").read_score(3, 2).status is Status.UNSCORED


def test_bfloat16_text(tmp_path):
    st = _create(tmp_path / "s", text_dtype="bfloat16")
    emb = np.array([[1.5] * D, [3.01] * D], np.float32)
    st.write_text_embedding(0, emb)
    got = Store.open(tmp_path / "s").read_text_embedding(0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, emb, rtol=2 ** -8)


def test_write_validation(tmp_path):
    st = _create(tmp_path / "s")
    with pytest.raises(ValueError, match=r"\(len, 8\)"):
        st.write_text_embedding(0, np.zeros((L + 1, D)))
    with pytest.raises(ValueError, match="store expects"):
        st.write_latents(0, 0, np.zeros((2, 3, 4, 4)), seed=0)
    with pytest.raises(ValueError, match="boxes_object"):
        st.write_score(0, 0, status=Status.VALID, dsr=0.5, boxes_object=np.zeros((T + 1, 4)))
    with pytest.raises(ValueError, match="finite"):
        st.write_score(0, 0, status=Status.VALID, dsr=float("nan"))
    with pytest.raises(IndexError):
        st.write_score(P, 0, status=Status.VALID, dsr=0.5)
    with pytest.raises(KeyError, match="nope"):
        st.prompt_index("nope")


def test_create_validation(tmp_path):
    bad = _prompts()
    del bad[1]["animal"]
    with pytest.raises(StoreError, match=r"row 1 \(p1\).*animal"):
        create_store(tmp_path / "a", bad, samples_per_prompt=S, latent_shape=LATENT, num_frames=T, text_dim=D)
    dup = _prompts()
    dup[2]["prompt_id"] = "p0"
    with pytest.raises(StoreError, match="twice"):
        create_store(tmp_path / "b", dup, samples_per_prompt=S, latent_shape=LATENT, num_frames=T, text_dim=D)
    _create(tmp_path / "c")
    with pytest.raises(StoreError, match="not empty"):
        _create(tmp_path / "c")


def test_open_validation(tmp_path):
    with pytest.raises(StoreError, match="store.json is missing"):
        Store.open(tmp_path / "none")
    _create(tmp_path / "s")
    # Wrong layout version.
    meta_path = tmp_path / "s" / "store.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "layout_version": 99}))
    with pytest.raises(StoreError, match="layout_version 99"):
        Store.open(tmp_path / "s")
    # store.json disagreeing with an array's shape.
    meta_path.write_text(json.dumps({**meta, "num_frames": T + 1}))
    with pytest.raises(StoreError, match=r"'boxes_animal' has shape \[4, 3, 6, 4\].*expected shape \[4, 3, 7, 4\]"):
        Store.open(tmp_path / "s")
    # Hand-damaged JSON, and a folder a stopped create left without store.json.
    meta_path.write_text("{not json")
    with pytest.raises(StoreError, match="store.json is not valid JSON"):
        Store.open(tmp_path / "s")
    meta_path.unlink()
    with pytest.raises(StoreError, match="a create that was stopped"):
        Store.open(tmp_path / "s")
    # The folder above a store, or an unrelated one, is not called a stopped create (to be deleted).
    with pytest.raises(StoreError, match=r"its subfolders \['s2x'\] are stores: name one of them"):
        _create(tmp_path / "parent" / "s2x")
        Store.open(tmp_path / "parent")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("")
    with pytest.raises(StoreError, match=r"missing \(create one with"):
        Store.open(tmp_path / "unrelated")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "s" / "prompts.json").write_text("[{")
    with pytest.raises(StoreError, match="prompts.json is not valid JSON"):
        Store.open(tmp_path / "s")
    _create(tmp_path / "s2")
    shutil.copy(tmp_path / "s2" / "prompts.json", tmp_path / "s" / "prompts.json")
    Store.open(tmp_path / "s")
    # A missing array.
    shutil.rmtree(tmp_path / "s" / "dsr")
    with pytest.raises(StoreError, match=r"array 'dsr' is missing \(expected shape \[4, 3\] dtype float32\)"):
        Store.open(tmp_path / "s")


def test_status_table():
    assert set(STATUS_DESCRIPTIONS) == set(Status)
    assert Status.TOO_FEW_TRACKED_FRAMES.is_invalid and not Status.TOO_FEW_TRACKED_FRAMES.is_failure
    assert Status.UNREADABLE_VIDEO.is_failure and not Status.VALID.is_invalid and not Status.VALID.is_failure
    assert all(-128 <= int(s) < 128 for s in Status)


def _write_prompts(path, prompt_ids):
    """Everything a scorer/sampler writes for one prompt; deterministic in the prompt index."""
    st = Store.open(path, mode="r+")
    for p in prompt_ids:
        rng = np.random.default_rng(p)
        st.write_text_embedding(p, rng.standard_normal((3 + p, D)).astype(np.float32))
        for s in range(S):
            st.write_latents(p, s, rng.standard_normal(LATENT).astype(np.float32), seed=10 * p + s)
            st.write_score(p, s, status=Status.VALID, dsr=float(rng.uniform()),
                           boxes_animal=rng.uniform(0, 9, (T, 4)), boxes_object=rng.uniform(0, 9, (T, 4)))


def test_concurrent_writers_match_one_writer(tmp_path):
    _create(tmp_path / "one")
    _write_prompts(tmp_path / "one", range(P))
    _create(tmp_path / "many")
    ctx = mp.get_context("spawn")  # TensorStore must not run in forked children
    shards = [[0, 3], [1], [2]]
    procs = [ctx.Process(target=_write_prompts, args=(tmp_path / "many", ids)) for ids in shards]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(120)
        assert pr.exitcode == 0
    one, many = _all_arrays(tmp_path / "one"), _all_arrays(tmp_path / "many")
    assert one.keys() == many.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)
    assert (one["status"] == Status.VALID).all()
