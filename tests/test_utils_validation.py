"""skdebias._utils._validation: parameter, label, group-label, sample and CAV-vector checks."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import DataConversionWarning

from skdebias._utils._validation import (
    UNLABELLED,
    check_choice,
    check_concept_labels,
    check_group_labels,
    check_int,
    check_real,
    check_y,
    encode_y,
    unit_vector,
)


def test_check_group_labels():
    assert check_group_labels(np.array([0.0, 2.0, 1.0]), 3).dtype == np.int64
    assert check_group_labels(torch.tensor([1, 0]), 2).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"bias contains NaN or infinity \(first at sample 1: nan"):
        check_group_labels([0.0, np.nan, np.inf], 3)
    with pytest.raises(ValueError, match="group contains NaN or infinity .first at sample 2: inf"):
        check_group_labels([0.0, 1.0, np.inf], 3, name="group")
    with pytest.raises(ValueError, match="integer group labels .* sample 1 is 0.5"):
        check_group_labels([0.0, 0.5], 2)
    with pytest.raises(ValueError, match="integer group labels"):
        check_group_labels(np.array(["a", "b"]), 2)
    with pytest.raises(ValueError, match="one label per sample"):
        check_group_labels([0, 1], 3)


def test_check_int():
    assert check_int("k", 3) == 3 and type(check_int("k", np.int64(3))) is int
    assert check_int("n", 0, low=0) == 0
    for value in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=rf"^k must be a positive integer, got {value!r}\.$"):
            check_int("k", value)
    with pytest.raises(ValueError, match=r"^n must be an integer >= 0, got -1\.$"):
        check_int("n", -1, low=0)
    with pytest.raises(ValueError, match=r"^n must be an integer in 1\.\.5, got 6\.$"):
        check_int("n", 6, high=5)


def test_check_real():
    assert check_real("lr", 1) == 1.0 and type(check_real("lr", np.float32(0.5))) is float
    assert check_real("p", 0.0, low=0, high=1) == 0.0
    for value in (np.nan, np.inf, True, "0.1", None):
        with pytest.raises(ValueError, match=rf"^lr must be a finite number, got {value!r}\.$"):
            check_real("lr", value)
    with pytest.raises(ValueError, match=r"^p must be a finite number > 0 and < 1, got 1\.$"):
        check_real("p", 1, low=0, high=1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"^p must be a finite number >= 0 and <= 1, got -0\.5\.$"):
        check_real("p", -0.5, low=0, high=1)


def test_check_choice():
    assert check_choice("mode", "a", ("a", "b")) == "a"
    assert check_choice("layer", None, (None, "x")) is None
    with pytest.raises(ValueError, match=r"^mode='c' is not valid; choose one of \('a', 'b'\)\.$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="is not valid"):  # an array does not break the test
        check_choice("mode", np.array(["a", "b"]), ("a", "b"))
    with pytest.raises(ValueError, match="is not valid"):  # 1 is not the string "1"
        check_choice("mode", 1, ("1",))


def test_check_y():
    y = check_y(torch.tensor([0, 1, 1]), 3)
    assert isinstance(y, np.ndarray) and y.tolist() == [0, 1, 1]
    with pytest.warns(DataConversionWarning):
        assert check_y(np.array([[0], [1]]), 2).shape == (2,)
    with pytest.raises(ValueError, match="requires y to be passed, but the target y is None"):
        check_y(None, 3)
    with pytest.raises(ValueError, match=r"y must be 1-d \(one label per sample\), got "
                                         r"shape \(2, 2\)"):
        check_y(np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="X and y have inconsistent numbers of samples: X has 3, "
                                         "y has 2"):
        check_y([0, 1], 3)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        check_y([0.5, 1.5, 2.5], 3)


def test_check_concept_labels():
    assert UNLABELLED == -1
    assert check_concept_labels(None, 3, required=False) is None
    with pytest.raises(ValueError, match="concept_labels are required to fit the CAV"):
        check_concept_labels(None, 3)
    c = check_concept_labels(np.array([True, False, True]), 3)
    assert c.dtype == np.int64 and c.tolist() == [1, 0, 1]
    assert check_concept_labels(torch.tensor([1.0, 0.0, -1.0]), 3).tolist() == [1, 0, -1]
    # one labelled class is allowed when the labels are optional
    assert check_concept_labels([1, -1, 1], 3, required=False).tolist() == [1, -1, 1]
    with pytest.raises(ValueError, match=r"contain one class only \(\[1\]\)"):
        check_concept_labels([1, -1, 1], 3)
    with pytest.raises(ValueError, match=r"one entry per sample \(3\), got shape \(2,\)"):
        check_concept_labels([0, 1], 3)
    with pytest.raises(ValueError, match=r"must hold 0 \(concept absent\), 1 \(present\) or -1 "
                                         r"\(no label\); got values \[0, 1, 2\]"):
        check_concept_labels([0, 1, 2], 3)
    with pytest.raises(ValueError, match="must be numeric 0/1"):
        check_concept_labels([0.0, 1.0, np.nan], 3)
    with pytest.raises(ValueError, match="must be numeric 0/1"):
        check_concept_labels(["a", "b", "a"], 3)


def test_encode_y_maps_labels_to_output_indices():
    classes = np.array(["cat", "dog", "eel"])
    idx = encode_y(np.array(["eel", "cat", "eel"]), classes)
    assert idx.dtype == np.int64 and idx.tolist() == [2, 0, 2]
    # classes in output order, not sorted
    assert encode_y(np.array([0, 1, 2]), np.array([2, 0, 1])).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"y contains labels \[5\] that are not among the "
                                         r"network's classes \[0, 1, 2\]"):
        encode_y(np.array([0, 5]), np.arange(3))


def test_unit_vector():
    v = unit_vector([3, 4])
    assert v.dtype == np.float64 and v.tolist() == [0.6, 0.8]
    assert unit_vector(torch.tensor([[0.0, 2.0]])).tolist() == [0.0, 1.0]  # flattened

    class Fitted:
        cav_ = np.array([0.0, -5.0])

    assert unit_vector(Fitted()).tolist() == [0.0, -1.0]
    for bad in ([0.0, 0.0], [], [1.0, np.nan], [np.inf, 1.0]):
        with pytest.raises(ValueError, match="^direction must be a non-zero finite vector"):
            unit_vector(bad, name="direction")
    with pytest.raises(ValueError, match="^cav must be a numeric vector or a fitted CAVEstimator"):
        unit_vector(["a", "b"])
