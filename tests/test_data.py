"""The pair sampler over the store: pairing rules, determinism, host slices, prefetch, bad stores."""

import gc
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from spatialalign_jax.train.pairs import (PAIRINGS, PairSampler, build_pair_table, draw_pairs, make_synthetic_store,
                                   usable_mask)
from spatialalign_jax.common.store import Status, Store, StoreError, create_store

LATENT = (2, 1, 2, 2)
D, L = 4, 8
V = Status.VALID
BAD = Status.NO_VALID_RUN


def prompt_rows(n, split="train"):
    return [{"type": "LR", "prompt_id": f"p{i}", "scene": "s", "initial_SR": "left", "final_SR": "right",
             "animal": "cat", "object": "box", "prompt": f"prompt {i}", "split": split} for i in range(n)]


def labelled_store(path, labels, *, splits=None, text=None, latents=None):
    """labels[p][s] = (status, dsr) or None (unscored). text[p] = False: prompt not encoded.
    latents[p][s] = False: no latents written."""
    rows = prompt_rows(len(labels))
    for i, split in enumerate(splits or []):
        rows[i]["split"] = split
    st = create_store(path, rows, samples_per_prompt=len(labels[0]), latent_shape=LATENT, num_frames=3,
                      text_dim=D, max_text_len=L)
    rng = np.random.default_rng(0)
    for p, row in enumerate(labels):
        if text is None or text[p]:
            st.write_text_embedding(p, rng.standard_normal((p % 3 + 2, D)).astype(np.float32))
        for s, lab in enumerate(row):
            if latents is None or latents[p][s]:
                st.write_latents(p, s, rng.standard_normal(LATENT).astype(np.float32), seed=100 * p + s)
            if lab is not None:
                st.write_score(p, s, status=lab[0], dsr=lab[1])
    return st


LABELS = [
    # p0: winners 0, 2; losers 1, 3 (3 is exactly below tau); sample 2 ties with 0 for "random"
    [(V, 0.9), (V, 0.3), (V, 0.9), (V, 0.6999)],
    # p1: only winners -> no threshold pair; random: (1 beats 0); top2: 1, 0
    [(V, 0.75), (V, 0.8), (BAD, 0.0), None],
    # p2: only losers + an invalid "winner" -> no threshold pair
    [(V, 0.5), (BAD, 0.0), (V, 0.2), (Status.MODEL_ERROR, 0.0)],
    # p3: one valid sample only, exactly at tau -> a winner without a loser
    [(V, 0.7), None, None, None],
]


def pairs_of(table):
    return {int(p): sorted(map(tuple, pp.tolist())) for p, pp in zip(table.prompts, table.pairs)}


def test_pairing_rules(tmp_path):
    st = labelled_store(tmp_path / "s", LABELS)
    th = PairSampler(st, global_batch_size=2, max_text_len=L)
    assert pairs_of(th.table) == {0: [(0, 1), (0, 3), (2, 1), (2, 3)]}
    rnd = PairSampler(st, global_batch_size=2, pairing="random", max_text_len=L)
    # p0: all pairs but the 0.9/0.9 tie; higher DSR first
    assert pairs_of(rnd.table) == {0: sorted([(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)]), 1: [(1, 0)], 2: [(0, 2)]}
    top = PairSampler(st, global_batch_size=2, pairing="top2", max_text_len=L)
    assert pairs_of(top.table) == {0: [(0, 2), (2, 0)], 1: [(0, 1), (1, 0)], 2: [(0, 2), (2, 0)], 3: [(0, 0)]}
    # a lower threshold turns p1's 0.75 / 0.8 into winner / loser at tau = 0.78
    assert pairs_of(PairSampler(st, global_batch_size=2, tau=0.78, max_text_len=L).table) == {
        0: [(0, 1), (0, 3), (2, 1), (2, 3)], 1: [(1, 0)]}
    with pytest.raises(ValueError, match="unknown pairing 'best'.*threshold, random, top2"):
        PairSampler(st, global_batch_size=2, pairing="best")


def test_unfinished_samples_and_splits_are_not_used(tmp_path):
    labels = [[(V, 0.9), (V, 0.1)], [(V, 0.9), (V, 0.1)], [(V, 0.9), (V, 0.1)], [(V, 0.9), (V, 0.1)]]
    st = labelled_store(tmp_path / "s", labels, splits=["train", "train", "train", "test"], text=[True, False, True, True],
                        latents=[[True, True], [True, True], [True, False], [True, True]])
    # p1 has no text, p2's loser has no latents, p3 is a test prompt
    assert pairs_of(PairSampler(st, global_batch_size=2, max_text_len=L).table) == {0: [(0, 1)]}
    assert pairs_of(PairSampler(st, global_batch_size=2, max_text_len=L, split=None).table) == {0: [(0, 1)], 3: [(0, 1)]}
    assert pairs_of(PairSampler(st, global_batch_size=2, max_text_len=L, split="test").table) == {3: [(0, 1)]}


def test_draws_are_uniform_over_prompts_then_pairs():
    dsr = np.array([[0.9, 0.1, 0.2, 0.3], [0.9, 0.8, 0.1, 0.5]], np.float32)
    table = build_pair_table(dsr, np.ones_like(dsr, bool))
    # p0 has 3 pairs, p1 has 4: prompts are equally likely all the same
    counts, pair_counts = Counter(), Counter()
    for step in range(500):
        p, w, lo = draw_pairs(table, seed=3, step=step, batch_size=8)
        counts.update(p.tolist())
        pair_counts.update(zip(p.tolist(), w.tolist(), lo.tolist()))
    n = 500 * 8
    assert abs(counts[0] / n - 0.5) < 0.03
    for (p, _, _), c in pair_counts.items():
        expected = n / 2 / len(table.pairs[p])
        assert abs(c - expected) < 0.15 * expected, (p, c, expected)
    assert len(pair_counts) == 7


def test_batch_contents_match_the_store(tmp_path):
    st = labelled_store(tmp_path / "s", LABELS)
    sampler = PairSampler(tmp_path / "s", global_batch_size=4, pairing="random", max_text_len=10, seed=5)
    batch = sampler.read_batch(0)
    assert batch["latents_w"].shape == (4, *LATENT) and batch["text_emb"].shape == (4, 10, D)
    dsr = st.read_dsr()
    for i in range(4):
        p, w, lo = (int(batch[k][i]) for k in ("prompt_index", "sample_w", "sample_l"))
        np.testing.assert_array_equal(batch["latents_w"][i], st.read_latents(p, w)[0])
        np.testing.assert_array_equal(batch["latents_l"][i], st.read_latents(p, lo)[0])
        rows = st.read_text_embedding(p)
        assert batch["text_len"][i] == len(rows)
        np.testing.assert_array_equal(batch["text_emb"][i, :len(rows)], rows)
        assert not batch["text_emb"][i, len(rows):].any()
        assert batch["dsr_w"][i] == dsr[p, w] > batch["dsr_l"][i] == dsr[p, lo]
    assert all(batch[k].dtype == np.float32 for k in ("latents_w", "latents_l", "text_emb", "dsr_w", "dsr_l"))


def test_determinism_across_recreation_and_resume(tmp_path):
    make_synthetic_store(tmp_path / "s", num_prompts=8, samples_per_prompt=4, latent_shape=LATENT, text_dim=D,
                         num_frames=3, max_text_len=L, seed=1)
    a = PairSampler(tmp_path / "s", global_batch_size=4, seed=7, max_text_len=L)
    first = [next(a) for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))
    assert state["step"] == 3
    nxt = next(a)

    b = PairSampler(tmp_path / "s", global_batch_size=4, seed=7, max_text_len=L)
    for x, y in zip(first, [next(b) for _ in range(3)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    resumed = PairSampler(tmp_path / "s", global_batch_size=4, seed=7, max_text_len=L)
    resumed.load_state_dict(state)
    got = next(resumed)
    for k in nxt:
        np.testing.assert_array_equal(nxt[k], got[k])

    other = PairSampler(tmp_path / "s", global_batch_size=4, seed=8, max_text_len=L)
    assert any(not np.array_equal(a.global_indices(s)[0], other.global_indices(s)[0]) for s in range(4))
    with pytest.raises(ValueError, match="seed=7 but this sampler has 8"):
        other.load_state_dict(state)


def test_host_slices_partition_the_global_batch(tmp_path):
    make_synthetic_store(tmp_path / "s", num_prompts=6, samples_per_prompt=3, latent_shape=LATENT, text_dim=D,
                         num_frames=3, max_text_len=L)
    whole = PairSampler(tmp_path / "s", global_batch_size=6, max_text_len=L).read_batch(4)
    parts = [PairSampler(tmp_path / "s", global_batch_size=6, num_hosts=3, host_index=h, max_text_len=L).read_batch(4)
             for h in range(3)]
    for k in whole:
        assert parts[0][k].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    with pytest.raises(ValueError, match="multiple of num_hosts=4"):
        PairSampler(tmp_path / "s", global_batch_size=6, num_hosts=4, max_text_len=L)
    with pytest.raises(ValueError, match="host_index=3 is out of range"):
        PairSampler(tmp_path / "s", global_batch_size=6, num_hosts=3, host_index=3, max_text_len=L)


def test_prefetch_order_state_and_errors(tmp_path):
    make_synthetic_store(tmp_path / "s", num_prompts=6, samples_per_prompt=3, latent_shape=LATENT, text_dim=D,
                         num_frames=3, max_text_len=L)
    sampler = PairSampler(tmp_path / "s", global_batch_size=2, max_text_len=L)
    sampler.step = 2
    with sampler.prefetch(depth=2) as pf:
        got = [next(pf) for _ in range(4)]
        assert sampler.step == 6  # consumed, not prefetched
        # batches read ahead came from the current table: no refresh, no second reader meanwhile
        with pytest.raises(RuntimeError, match="close it first"):
            sampler.refresh()
        with pytest.raises(RuntimeError, match="close it first"):
            sampler.prefetch()
    assert not pf._thread.is_alive()
    sampler.refresh()  # closed: fine again
    for i, batch in enumerate(got):
        np.testing.assert_array_equal(batch["latents_w"], sampler.read_batch(2 + i)["latents_w"])

    original = sampler.read_batch

    def failing(step):
        if step == 8:
            raise OSError("disk gone")
        return original(step)

    sampler.read_batch = failing
    pf = sampler.prefetch(depth=1)
    next(pf), next(pf)
    with pytest.raises(OSError, match="disk gone"):
        next(pf)
    assert sampler.step == 8 and not pf._thread.is_alive()
    with pytest.raises(StopIteration):
        next(pf)

    # Dropped without close(): garbage collection stops the reader and frees the sampler.
    sampler.read_batch = original
    pf = sampler.prefetch(depth=1)
    next(pf)
    thread = pf._thread
    del pf
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    sampler.prefetch().close()


def test_bad_stores_give_clear_errors(tmp_path):
    # nothing scored yet
    st = labelled_store(tmp_path / "unscored", [[None, None], [None, None]])
    with pytest.raises(StoreError, match=r"no prompt has a usable pair for pairing 'threshold' \(tau_train=0.7\)"
                                          r".*Prompts: 2 .*4, 0 scored, 0 VALID, 0 usable"):
        PairSampler(st, global_batch_size=2, max_text_len=L)
    # scored, but nothing reaches the threshold
    st = labelled_store(tmp_path / "losers", [[(V, 0.5), (V, 0.2)], [(BAD, 0.0), (V, 0.6)]])
    with pytest.raises(StoreError, match=r"4, 4 scored, 3 VALID, 3 usable .*0 have DSR >= 0.7 and 3 below"):
        PairSampler(st, global_batch_size=2, max_text_len=L)
    assert pairs_of(PairSampler(st, global_batch_size=2, tau=0.45, max_text_len=L).table) == {0: [(0, 1)]}
    with pytest.raises(StoreError, match=r"no prompt is in split 'test'; its prompts are in \['train'\]"):
        PairSampler(st, global_batch_size=2, split="test", max_text_len=L)
    # a prompt's text is longer than the batch's max_text_len
    st = labelled_store(tmp_path / "long", [[(V, 0.9), (V, 0.1)]] * 3)
    with pytest.raises(StoreError, match="more than max_text_len=2"):
        PairSampler(st, global_batch_size=2, max_text_len=2)
    # a missing array, an array whose shape does not match store.json: store.py's checks
    shutil.rmtree(tmp_path / "long" / "latents")
    with pytest.raises(StoreError, match="array 'latents' is missing"):
        PairSampler(tmp_path / "long", global_batch_size=2, max_text_len=L)
    meta = json.loads((tmp_path / "losers" / "store.json").read_text())
    meta["latent_shape"] = [3, 1, 2, 2]
    (tmp_path / "losers" / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="array 'latents' has shape .* expected shape"):
        PairSampler(tmp_path / "losers", global_batch_size=2, max_text_len=L)
    with pytest.raises(StoreError, match="is not a store"):
        PairSampler(tmp_path / "nowhere", global_batch_size=2)


def test_reading_while_the_scorer_writes(tmp_path):
    labels = [[(V, 0.9), (V, 0.1), None], [None, None, None]]
    labelled_store(tmp_path / "s", labels, latents=[[True, True, True], [True, True, False]])
    sampler = PairSampler(tmp_path / "s", global_batch_size=2, max_text_len=L)
    assert pairs_of(sampler.table) == {0: [(0, 1)]}
    writer = Store.open(tmp_path / "s", mode="r+")
    writer.write_score(1, 0, status=V, dsr=0.8)
    writer.write_score(1, 1, status=V, dsr=0.3)
    writer.write_score(0, 2, status=V, dsr=0.95)
    assert pairs_of(sampler.table) == {0: [(0, 1)]}  # nothing changes before refresh
    before = sampler.state_dict()
    sampler.refresh()
    assert pairs_of(sampler.table) == {0: [(0, 1), (2, 1)], 1: [(0, 1)]}
    # a sample scored VALID whose latents are not there yet stays out
    writer.write_score(1, 2, status=V, dsr=0.05)
    sampler.refresh()
    assert pairs_of(sampler.table)[1] == [(0, 1)]
    writer.write_latents(1, 2, np.ones(LATENT, np.float32), seed=9)
    writer.reset_score(0, 0)  # re-scoring in progress
    sampler.refresh()
    assert pairs_of(sampler.table) == {0: [(2, 1)], 1: [(0, 1), (0, 2)]}
    with pytest.warns(UserWarning, match="labels changed"):
        sampler.load_state_dict(before)


def test_synthetic_store_mix():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        st = make_synthetic_store(d + "/s", num_prompts=8, samples_per_prompt=5, latent_shape=LATENT, text_dim=D,
                                  num_frames=3, max_text_len=L, seed=2)
        status = st.read_status()
        assert (status == V).any() and (status == Status.UNSCORED).any()
        assert np.isin(status, [Status.TOO_FEW_VALID_FRAMES, Status.NO_VALID_RUN, Status.MODEL_ERROR,
                                Status.TOO_FEW_TRACKED_FRAMES]).any()
        usable = usable_mask(status, st.read_dsr(), st.read_seeds(), st.read_text_lengths())
        table = build_pair_table(st.read_dsr(), usable)
        assert 3 not in table.prompts and 7 not in table.prompts  # every fourth prompt lacks its winner
        assert len(table.prompts) >= 4
        for pairing in PAIRINGS:
            PairSampler(st, global_batch_size=2, pairing=pairing, max_text_len=L).read_batch(0)
