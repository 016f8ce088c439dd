"""DSR-Score against hand-computed cases (SPEC section 3).

Expected values are written out as explicit arithmetic on the box numbers, not computed by the
code under test.
"""

import math
import warnings

import numpy as np
import pytest

from scoring.dsr import (
    CORRECTNESS_TAUS,
    DSR_TYPES,
    correctness_at,
    correctness_curve,
    dsr_score,
    kept_frames,
    ssr_scores,
)

OBJ = (40.0, 40.0, 60.0, 60.0)  # centre (50, 50), 20 x 20
LEFT, RIGHT, TOP, BELOW = (0.0, 40.0, 20.0, 60.0), (80.0, 40.0, 100.0, 60.0), (40.0, 0.0, 60.0, 20.0), (40.0, 80.0, 60.0, 100.0)


def _video(start, end, n=20, n_start=3, n_end=3):
    """n frames: the animal box at `start` for n_start frames, at `end` for the last n_end, midway between."""
    mid = tuple((s + e) / 2 for s, e in zip(start, end))
    a = [start] * n_start + [mid] * (n - n_start - n_end) + [end] * n_end
    return np.array(a, float), np.array([OBJ] * n, float)


@pytest.mark.parametrize(
    "dsr_type,start,end,expected",
    [
        # Both relations on the same axis: every term reaches +-1, so a perfect video scores 1.
        ("LR", LEFT, RIGHT, 1.0),
        ("RL", RIGHT, LEFT, 1.0),
        # Mixed axes: at the start the final relation's SSR is 0 (cos = 0), so each gap is 0.5:
        # (1 + 0.5 + 1 + 0.5) / 8 + 0.5 = 0.875.
        ("LT", LEFT, TOP, 0.875),
        ("TL", TOP, LEFT, 0.875),
        ("RT", RIGHT, TOP, 0.875),
        ("TR", TOP, RIGHT, 0.875),
        # Exactly backwards: every term is -1 -> 0.
        ("LR", RIGHT, LEFT, 0.0),
        ("RL", LEFT, RIGHT, 0.0),
        # Staying left during an LR prompt: r_init = 1, r_f = -1, no gaps -> 0.5.
        ("LR", LEFT, LEFT, 0.5),
        # Mixed type, moving below instead of on top (y points down): (1 + 0.5 - 1 - 0.5) / 8 + 0.5.
        ("LT", LEFT, BELOW, 0.5),
        # TR from below to the right: r_init = -1, g_init = 0.5 * (-1 - 0), r_f = 1, g_f = 0.5 * (1 - 0).
        ("TR", BELOW, RIGHT, (-1 - 0.5 + 1 + 0.5) / 8 + 0.5),
    ],
)
def test_ideal_videos_per_type(dsr_type, start, end, expected):
    a, o = _video(start, end)
    assert dsr_score(a, o, dsr_type) == pytest.approx(expected, abs=1e-12)


def test_all_six_types_known():
    assert set(DSR_TYPES) == {"LR", "RL", "LT", "TL", "RT", "TR"}
    assert (DSR_TYPES["TL"].initial, DSR_TYPES["TL"].final) == ("T", "L")
    assert DSR_TYPES["RT"].initial_phrase == "on the right of" and DSR_TYPES["RT"].final_phrase == "to the top of"


def _rt_case():
    """An RT video with partial distances and oblique vectors; object (0, 0, 20, 20), centre (10, 10)."""
    f0 = (16, 12, 26, 20)    # centre (21, 16), 10 x 8: v = (11, 6)
    f1 = (30, 10, 40, 20)    # centre (35, 15), 10 x 10: v = (25, 5)
    f2 = (20, -10, 30, 0)    # centre (25, -5), 10 x 10: v = (15, -15)
    f17 = (5, -20, 15, -10)  # centre (10, -15), 10 x 10: v = (0, -25)
    f18 = (6, -14, 12, -6)   # centre (9, -10), 6 x 8: v = (-1, -20)
    f19 = (0, -4, 20, 4)     # centre (10, 0), 20 x 8: v = (0, -10)
    a = np.array([f0, f1, f2] + [f2] * 14 + [f17, f18, f19], float)
    o = np.array([(0, 0, 20, 20)] * 20, float)
    # initial = R: cos_x * clip(|v_x| / mean width), mean width = (w_a + 20) / 2.
    si0 = 11 / math.sqrt(11**2 + 6**2) * (11 / 15)
    si1 = 25 / math.sqrt(25**2 + 5**2) * 1.0          # 25 / 15 clipped to 1
    si2 = 15 / math.sqrt(15**2 + 15**2) * (15 / 15)
    si19 = 0.0                                        # v_x = 0
    # final = T: -cos_y * clip(|v_y| / mean height), mean height = (h_a + 20) / 2.
    sf0 = -(6 / math.sqrt(11**2 + 6**2)) * (6 / 14)
    sf17 = -(-25 / 25) * 1.0
    sf18 = -(-20 / math.sqrt(1 + 20**2)) * 1.0        # 20 / 14 clipped to 1
    sf19 = -(-10 / 10) * (10 / 14)
    r_init = (si0 + si1 + si2) / 3
    g_init = 0.5 * (si0 - si19)
    r_f = (sf17 + sf18 + sf19) / 3
    g_f = 0.5 * (sf19 - sf0)
    return a, o, (r_init + g_init + r_f + g_f) / 8 + 0.5, (si0, si1, si2, si19), (sf0, sf17, sf18, sf19)


def test_hand_computed_oblique_case():
    a, o, expected, si, sf = _rt_case()
    assert dsr_score(a, o, "RT") == pytest.approx(expected, abs=1e-9)
    s = ssr_scores(a, o, "RT")
    np.testing.assert_allclose(s.initial[[0, 1, 2, 19]], si, atol=1e-12)
    np.testing.assert_allclose(s.final[[0, 17, 18, 19]], sf, atol=1e-12)
    np.testing.assert_array_equal(s.frames, np.arange(20))
    # The same geometry checked with the other relation ordering (type TR swaps the sequences'
    # roles): r_init = mean of T at the start, r_f = mean of R at the end.
    si_tr = (sf[0], -(5 / math.sqrt(650)) * (5 / 15), -(-15 / math.sqrt(450)) * 1.0)
    sr18 = -1 / math.sqrt(401) * (1 / 13)  # v_x = -1, mean width (6 + 20) / 2 = 13
    r_init = sum(si_tr) / 3
    g_init = 0.5 * (sf[0] - sf[3])
    r_f = (0.0 + sr18 + 0.0) / 3
    g_f = 0.5 * (0.0 - si[0])
    assert dsr_score(a, o, "TR") == pytest.approx((r_init + g_init + r_f + g_f) / 8 + 0.5, abs=1e-9)


def test_missing_and_degenerate_rows_are_skipped():
    a, o, expected, _, _ = _rt_case()
    # Frames that would change every endpoint term if they were used.
    bad = [
        (np.full(4, np.nan), np.array((0, 0, 20, 20.0))),          # animal missing
        (np.array((100, 100, 120, 120.0)), np.full(4, np.nan)),    # object missing
        (np.array((300, 5, 300, 15.0)), np.array((0, 0, 20, 20.0))),   # zero-width animal
        (np.array((-300, 5, -290, 15.0)), np.array((7, 0, 7, 20.0))),  # zero-width object
        (np.array((-300, 5, -290, 5.0)), np.array((0, 3, 20, 3.0))),   # zero mean height
        (np.array((-300, 5, -290, 15.0)), np.array((0, 0, 20, np.nan))),  # partly missing row
    ]
    rows_a, rows_o = [bad[0][0], bad[1][0]], [bad[0][1], bad[1][1]]
    for i in range(20):
        rows_a.append(a[i])
        rows_o.append(o[i])
        if i == 9:
            rows_a += [b[0] for b in bad[2:4]]
            rows_o += [b[1] for b in bad[2:4]]
    rows_a += [b[0] for b in bad[4:]]
    rows_o += [b[1] for b in bad[4:]]
    a2, o2 = np.array(rows_a), np.array(rows_o)
    assert len(a2) == 26
    assert dsr_score(a2, o2, "RT") == pytest.approx(expected, abs=1e-9)
    np.testing.assert_array_equal(kept_frames(a2, o2), [2, 3, 4, 5, 6, 7, 8, 9, 10, 11] + list(range(14, 24)))


def test_invalid_below_twenty_kept_frames():
    a, o = _video(LEFT, RIGHT, n=20)
    assert dsr_score(a, o, "LR") == 1.0
    assert math.isnan(dsr_score(a[:19], o[:19], "LR"))
    a[7] = np.nan  # 20 frames, 19 kept
    assert math.isnan(dsr_score(a, o, "LR"))
    a = np.full((81, 4), np.nan)
    assert math.isnan(dsr_score(a, np.full((81, 4), np.nan), "TL"))


def test_coincident_centres_score_zero_without_warnings():
    # Frames 0-2: the animal centred on the object (|v| = 0 -> cos = 0 -> SSR 0); then far right.
    a = np.array([(45.0, 45.0, 55.0, 55.0)] * 3 + [RIGHT] * 17)
    o = np.array([OBJ] * 20)
    # s_L = [0, 0, 0, -1, ...], s_R = [0, 0, 0, 1, ...]:
    # r_init = 0, g_init = 0.5 * (0 - (-1)), r_f = 1, g_f = 0.5 * (1 - 0).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ssr_scores(a, o, "LR")
        got = dsr_score(a, o, "LR")
    np.testing.assert_array_equal(s.initial[:3], 0.0)
    assert got == pytest.approx((0 + 0.5 + 1 + 0.5) / 8 + 0.5, abs=1e-12)


def test_bad_arguments():
    a, o = _video(LEFT, RIGHT)
    with pytest.raises(ValueError, match="unknown DSR type 'XY'"):
        dsr_score(a, o, "XY")
    with pytest.raises(ValueError, match=r"\(T, 4\)"):
        dsr_score(a[:, :3], o, "LR")
    with pytest.raises(ValueError, match="same number of frames"):
        dsr_score(a[:-1], o, "LR")


def test_correctness():
    v = [np.nan, 0.7, 0.69, 0.95, np.nan]  # NaN = invalid or failed: stays in the denominator
    assert correctness_at(v, 0.0) == 3 / 5  # Correctness@0 is the validity rate
    assert correctness_at(v, 0.7) == 2 / 5
    assert correctness_at(v, 0.9) == 1 / 5
    assert correctness_at(v, 0.96) == 0.0
    curve = correctness_curve(v)
    assert list(curve) == list(CORRECTNESS_TAUS) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert curve[0.6] == 3 / 5 and curve[0.7] == 2 / 5 and curve[0.8] == 1 / 5
    with pytest.raises(ValueError):
        correctness_at([], 0.5)
