"""skdebias._utils._stats: tie-aware selection weights."""

import numpy as np
import pytest

from skdebias._utils._stats import end_weights, gap_weights


def test_end_weights_select_the_k_lowest():
    w = end_weights(np.array([3.0, 1.0, 2.0, 0.0]), 2)
    np.testing.assert_array_equal(w, [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(end_weights(np.arange(4.0), 4), np.ones(4))


def test_end_weights_ties_share_the_places_left():
    w = end_weights(np.array([0.0, 1.0, 1.0, 1.0, 2.0]), 2)
    np.testing.assert_allclose(w, [1.0, 1 / 3, 1 / 3, 1 / 3, 0.0])
    assert w.sum() == pytest.approx(2.0)
    # all tied: everyone gets k / n
    np.testing.assert_allclose(end_weights(np.zeros(4), 1), np.full(4, 0.25))


def test_gap_weights_are_high_end_minus_low_end():
    s = np.array([0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(gap_weights(s, 1), [-1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(gap_weights(np.array([0.0, 0.0, 1.0, 1.0]), 1),
                               [-0.5, -0.5, 0.5, 0.5])
    # k = n: both ends hold every sample, the gap weights cancel
    np.testing.assert_array_equal(gap_weights(s, 4), np.zeros(4))


def test_gap_weights_do_not_depend_on_the_order_of_ties():
    s = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 3.0])
    w = gap_weights(s, 2)
    perm = np.array([5, 3, 1, 4, 2, 0])
    np.testing.assert_allclose(gap_weights(s[perm], 2), w[perm])
    assert w.sum() == pytest.approx(0.0)
    np.testing.assert_allclose(w, [-1.0, -1 / 3, -1 / 3, -1 / 3, 1.0, 1.0])
