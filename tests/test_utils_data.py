"""skdebias._utils._data: the input check, batching over arrays / tensors / Datasets, subsets."""

import numpy as np
import pytest
import scipy.sparse
import torch

from _nets import INPLACE_CAV, inplace_net
from skdebias import ActivationExtractor
from skdebias._utils._data import (
    as_float32,
    check_input,
    check_input_shape,
    dataset_targets,
    first_batch,
    iter_batches,
    n_samples,
    reading,
    take,
    training_data,
)
from skdebias.attribution import attribute
from skdebias.metrics import concept_sensitivity, counterfactual_bias


def test_iter_batches_all_inputs(images):
    y = np.arange(20)
    for X in (images, torch.as_tensor(images), torch.utils.data.TensorDataset(torch.as_tensor(images))):
        got = list(iter_batches(X, batch_size=7))
        assert [b.shape[0] for b in got] == [7, 7, 6]
        np.testing.assert_allclose(torch.cat(got).numpy(), images)
    pairs = list(iter_batches(images, batch_size=8, y=y))
    np.testing.assert_array_equal(torch.cat([p[1] for p in pairs]).numpy(), y)
    sub = list(iter_batches(images, batch_size=4, indices=[3, 1]))
    np.testing.assert_allclose(sub[0].numpy(), images[[3, 1]])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(iter_batches(images, batch_size=0))


def test_inplace_first_layer_never_writes_into_the_callers_data(gray_images):
    X = gray_images
    before = X.copy()
    ActivationExtractor(inplace_net(inplace_first=True), "1", device="cpu").fit_transform(X)
    concept_sensitivity(inplace_net(inplace_first=True), X, "1", INPLACE_CAV)
    counterfactual_bias(inplace_net(inplace_first=True), X, X.copy(), [0, 1, 0, 1, 0, 1])
    attribute(inplace_net(inplace_first=True), X, method="gradient_x_input", device="cpu")
    np.testing.assert_array_equal(X, before)
    Xt = torch.as_tensor(before.copy())
    ActivationExtractor(inplace_net(inplace_first=True), "1", device="cpu").fit_transform(Xt)
    np.testing.assert_array_equal(Xt.numpy(), before)


def test_n_samples_and_first_batch():
    assert n_samples(np.zeros((5, 2, 3))) == 5
    assert n_samples(torch.zeros(4, 1)) == 4
    assert n_samples(torch.utils.data.TensorDataset(torch.zeros(3, 2))) == 3
    batch = first_batch(np.arange(6, dtype=np.float64).reshape(3, 2))
    assert batch.dtype == torch.float32 and batch.tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("kind", ["array", "tensor", "dataset"])
def test_iter_batches_over_indices_with_y(kind):
    X = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10) * 10
    data = {"array": X, "tensor": torch.as_tensor(X),
            "dataset": torch.utils.data.TensorDataset(torch.as_tensor(X),
                                                      torch.as_tensor(y))}[kind]
    idx = [7, 2, 5]
    got = list(iter_batches(data, batch_size=2, y=y, indices=idx))
    assert [xb.shape[0] for xb, _ in got] == [2, 1]
    np.testing.assert_array_equal(torch.cat([xb for xb, _ in got]).numpy(), X[idx])
    np.testing.assert_array_equal(torch.cat([yb for _, yb in got]).numpy(), y[idx])


def test_iter_batches_converts_as_it_reads():
    # uint8 images are scaled to [0, 1]; dtype=None keeps the values; any stride is accepted
    X8 = np.full((2, 1, 2, 2), 255, dtype=np.uint8)
    (xb,) = iter_batches(X8, batch_size=4)
    assert xb.dtype == torch.float32 and bool(torch.all(xb == 1.0))
    (raw,) = iter_batches(X8, batch_size=4, dtype=None)
    assert raw.dtype == torch.uint8 and int(raw.max()) == 255
    reversed_ = np.arange(8, dtype=np.float64).reshape(2, 4)[:, ::-1]
    (xb,) = iter_batches(reversed_, batch_size=2)
    np.testing.assert_array_equal(xb.numpy(), reversed_.astype(np.float32))


def test_iter_batches_never_yields_a_view_of_the_callers_array():
    X = np.zeros((4, 3), dtype=np.float32)
    for xb in iter_batches(X, batch_size=2):
        xb.add_(1.0)
    assert not X.any()


def test_take_rows_of_arrays_tensors_and_datasets():
    X = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(take(X, [4, 1]), X[[4, 1]])
    rows = take(torch.as_tensor(X), np.array([4, 1]))
    assert isinstance(rows, torch.Tensor) and rows.tolist() == X[[4, 1]].tolist()
    sub = take(torch.utils.data.TensorDataset(torch.as_tensor(X)), np.array([4, 1]))
    assert isinstance(sub, torch.utils.data.Subset) and len(sub) == 2
    assert sub[0][0].tolist() == X[4].tolist() and sub[1][0].tolist() == X[1].tolist()


def test_dataset_targets():
    X, y = torch.zeros(4, 2), torch.tensor([1, 0, 2, 1])

    class WithTargets(torch.utils.data.Dataset):
        targets = [3, 4]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(2)

    assert dataset_targets(np.zeros((4, 2))) is None  # not a Dataset
    assert dataset_targets(torch.utils.data.TensorDataset(X)) is None  # items without labels
    np.testing.assert_array_equal(dataset_targets(torch.utils.data.TensorDataset(X, y)),
                                  [1, 0, 2, 1])
    np.testing.assert_array_equal(dataset_targets(WithTargets()), [3, 4])


def test_training_data_keeps_float32_arrays_and_relabels_the_rest():
    X = np.zeros((3, 2), np.float32)
    assert training_data(X) is X
    pairs = training_data(X.astype(np.float64) + 1, y=[2, 0, 1])
    x, label = pairs[2]
    assert len(pairs) == 3 and x.dtype == torch.float32 and x.tolist() == [1.0, 1.0]
    assert int(label) == 1
    ds = torch.utils.data.TensorDataset(torch.ones(2, 2), torch.tensor([5, 6]))
    assert int(training_data(ds)[1][1]) == 0  # no labels given: zeros


def test_check_input_accepts_and_passes_through():
    X = np.zeros((3, 2, 2), np.float32)
    out, shape = check_input(X)
    assert out is X and shape == (2, 2)  # nothing converted
    ds = torch.utils.data.TensorDataset(torch.zeros(2, 1))
    out, shape = check_input(torch.utils.data.DataLoader(ds))
    assert out is ds and shape is None  # a DataLoader's dataset; a Dataset has no fixed shape
    out, shape = check_input([[1.0, 2.0], [3.0, 4.0]])
    assert isinstance(out, np.ndarray) and shape == (2,)


def test_check_input_messages():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(TypeError, match="X is an IterableDataset.*pass a map-style Dataset"):
        check_input(Stream())
    assert check_input(Stream(), allow_iterable=True)[1] is None
    with pytest.raises(ValueError, match="X is an empty Dataset"):
        check_input(torch.utils.data.TensorDataset(torch.zeros(0, 1)))
    with pytest.raises(TypeError, match=r"Sparse input is not supported: pass X as a dense"):
        check_input(scipy.sparse.csr_matrix(np.eye(3)))
    with pytest.raises(ValueError, match="Complex data not supported: imgs must hold real"):
        check_input(np.zeros((2, 2), complex), name="imgs")
    with pytest.raises(ValueError, match=r"at least 2 dimensions and 1 sample, got shape \(3,\)"):
        check_input(torch.zeros(3))
    with pytest.raises(ValueError, match="^X: Expected 2D array, got 1D array"):
        check_input(np.zeros(3))  # sklearn's message, prefixed with the argument's name
    with pytest.raises(ValueError, match=r"^X: Found array with 0 sample\(s\)"):
        check_input(np.zeros((0, 2)))
    bad = np.zeros((4, 2), np.float32)
    bad[2, 1] = np.inf
    # the message names the first bad sample
    with pytest.raises(ValueError, match=r"^Input X contains NaN or infinity \(first \w+ "
                                         r"sample 2\)"):
        check_input(bad)
    with pytest.raises(ValueError, match=r"NaN or infinity \(first \w+ sample 2\)"):
        check_input(torch.as_tensor(bad))
    with pytest.warns(UserWarning, match="X holds uint8 images; they are scaled"):
        check_input(np.zeros((2, 1, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="X holds int32 images, whose value range is unknown"):
        check_input(np.zeros((2, 1, 2, 2), np.int32))


def test_check_input_shape_messages():
    class Est:
        pass

    check_input_shape(Est(), (3, 8, 8), (3, 8, 8))  # same shape
    check_input_shape(Est(), None, (3, 8, 8))  # a Dataset: not checked
    check_input_shape(Est(), (3, 8, 8), None)  # fitted on a Dataset
    with pytest.raises(ValueError, match="^X has 5 features, but Est is expecting 4 features "
                                         "as input"):
        check_input_shape(Est(), (5,), (4,))
    with pytest.raises(ValueError, match=r"^X has per-sample shape \(3, 14, 14\), but Est was "
                                         r"fitted on \(3, 28, 28\)"):
        check_input_shape(Est(), (3, 14, 14), (3, 28, 28))


def test_as_float32_converts_whole_inputs_and_reports_non_finite_samples():
    X = as_float32(np.arange(12).reshape(6, 2))
    assert X.dtype == np.float32 and X.shape == (6, 2)
    assert as_float32(torch.ones(2, 3, dtype=torch.float64)).dtype == torch.float32
    assert as_float32([[1, 2], [3, 4]]).dtype == np.float32
    f32 = np.ones((2, 2), dtype=np.float32)
    assert np.shares_memory(as_float32(f32), f32)  # no copy
    bad = np.zeros((4, 2, 2))
    bad[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"images contains NaN or infinity \(first at sample 2\)"):
        as_float32(bad, name="images")
    bad[2, 1, 0], bad[3, 0, 0] = 0.0, 1e39  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"first at sample 3\) once converted to float32"):
        as_float32(bad)
    with pytest.raises(ValueError, match=r"first at sample 1"):
        as_float32(torch.tensor([[0.0], [float("-inf")]]))
    with pytest.raises(ValueError, match="^X: "):
        as_float32(np.array([["a"], ["b"]]))


class _Stream(torch.utils.data.IterableDataset):
    """Items ``(x, 0)`` of ``X`` in order, without a length."""

    def __init__(self, X):
        self.X = X

    def __iter__(self):
        for x in self.X:
            yield torch.as_tensor(x), 0


class _Bytes(torch.utils.data.Dataset):
    """uint8 items, with the process that read them recorded."""

    def __init__(self, X):
        self.X = X

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], torch.utils.data.get_worker_info() is not None


def test_iter_batches_reads_datasets_through_dataloader_workers():
    X = np.random.RandomState(0).randint(0, 256, (10, 3, 4, 4)).astype(np.uint8)
    expected = X.astype(np.float32) / 255
    for workers in (0, 2):
        got = torch.cat(list(iter_batches(_Bytes(X), batch_size=4, num_workers=workers)))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    sub = torch.cat(list(iter_batches(_Bytes(X), batch_size=3, indices=[5, 1, 7, 2],
                                      num_workers=2)))
    np.testing.assert_allclose(sub.numpy(), expected[[5, 1, 7, 2]], rtol=1e-6)
    with reading(num_workers=2):  # the estimators' num_workers, as the default
        got = torch.cat(list(iter_batches(_Bytes(X), batch_size=4)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"num_workers must be an integer >= 0, got "
                                             f"{bad!r}"):
            list(iter_batches(X, num_workers=bad))
        with pytest.raises(ValueError, match="num_workers"):
            with reading(bad):
                pass


def test_iter_batches_streams_an_iterable_dataset_once():
    X = np.random.RandomState(0).rand(9, 2, 3, 3).astype(np.float32)
    got = list(iter_batches(_Stream(X), batch_size=4))
    assert [b.shape[0] for b in got] == [4, 4, 1]
    np.testing.assert_array_equal(torch.cat(got).numpy(), X)
    with pytest.raises(TypeError, match="IterableDataset is read once"):
        list(iter_batches(_Stream(X), y=np.zeros(9)))
    np.testing.assert_array_equal(first_batch(_Stream(X)).numpy(), X[:1])
    with pytest.raises(ValueError, match="empty IterableDataset"):
        first_batch(_Stream(X[:0]))


def test_iter_batches_converts_memmaps_per_batch(tmp_path):
    X = np.random.RandomState(0).randint(0, 256, (20, 3, 4, 4)).astype(np.uint8)
    mm = np.memmap(tmp_path / "x", dtype=np.uint8, mode="w+", shape=X.shape)
    mm[:] = X
    got = list(iter_batches(mm, batch_size=8))
    assert all(b.dtype == torch.float32 for b in got)
    np.testing.assert_allclose(torch.cat(got).numpy(), X / np.float32(255), rtol=1e-6)


@pytest.mark.parametrize("source, sent_first", [(np.uint8, True), (np.float16, True),
                                                (np.float32, False), (np.float64, False)])
def test_to_float_moves_narrow_data_before_converting(monkeypatch, source, sent_first):
    # bound for a device, data narrower than float32 (uint8 images: a quarter of the bytes)
    # travels as it is and is converted there; wider data is converted first
    from skdebias._utils import _data

    sent = []
    real = _data._send
    monkeypatch.setattr(_data, "_send", lambda x, device: sent.append(x.dtype) or real(x, device))
    raw = (np.arange(2 * 3 * 4 * 4) % 256).reshape(2, 3, 4, 4).astype(source)
    got = _data.to_float(raw, 3, device="cpu")
    expected = torch.as_tensor(raw.astype(np.float32)) / (255 if source == np.uint8 else 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.dtype == torch.float32
    assert sent[0] == (torch.from_numpy(raw).dtype if sent_first else torch.float32)
    # the batches of iter_batches go the same way
    sent.clear()
    batches = list(iter_batches(np.concatenate([raw] * 3), batch_size=4, device="cpu"))
    assert [b.shape[0] for b in batches] == [4, 2]
    assert sent and all(d == sent[0] for d in sent)
