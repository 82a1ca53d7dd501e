"""skdebias._utils._runtime: devices, seeds, progress bars, CPU threads."""

import pytest
import torch

from skdebias._utils._runtime import (autocast, limit_threads, progress_bar, resolve_device,
                                      reuse_casts, set_seed)
from tests._nets import WeightCasts


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device='gpu0' is not valid"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="device=3 is not valid"):
        resolve_device(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_resolve_device_cuda_missing():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_device_takes_a_torch_device():
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")


def test_set_seed_none_leaves_the_global_generator_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert set_seed(None) is None
    assert torch.equal(torch.rand(3), expected)


def test_set_seed_returns_a_seeded_generator_and_seeds_torch():
    draws = []
    for seed in (3, 3, 4):
        gen = set_seed(seed)
        assert isinstance(gen, torch.Generator)
        draws.append((torch.rand(3, generator=gen), torch.rand(3)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[2][0])
    assert not torch.equal(draws[0][1], draws[2][1])


def test_progress_bar_off_returns_the_iterable_itself():
    items = [1, 2, 3]
    assert progress_bar(items, 0) is items
    assert progress_bar(items, False, total=3, desc="x") is items


def test_progress_bar_on_wraps_the_iterable_in_tqdm():
    from tqdm.auto import tqdm

    bar = progress_bar(iter([1, 2]), 1, total=2, desc="batches")
    assert isinstance(bar, tqdm) and bar.total == 2
    assert list(bar) == [1, 2]


def test_limit_threads_restores_the_count_also_after_an_error():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with limit_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), limit_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        with limit_threads(8):  # a limit never raises the count
            assert torch.get_num_threads() == 2
        with limit_threads(1):  # set inside the block: the setting from before comes back
            torch.set_num_threads(3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- precision
def test_check_precision_names_the_bad_value_and_the_allowed_ones():
    from skdebias._utils._runtime import check_precision

    assert check_precision("bfloat16", "cpu") == "bfloat16"
    assert check_precision("float32", torch.device("cpu")) == "float32"
    with pytest.raises(ValueError, match=r"precision.*'fp8'.*float32.*bfloat16.*float16"):
        check_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="precision='float16' needs a CUDA device.*bfloat16"):
        check_precision("float16", "cpu")


def test_autocast_float32_is_a_no_op_and_bfloat16_lowers_matmuls():
    from skdebias._utils._runtime import autocast

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast("float32", "cpu"):
        assert lin(x).dtype == torch.float32
    with autocast("bfloat16", torch.device("cpu")):
        out = lin(x)
        assert out.dtype == torch.bfloat16
    assert lin(x).dtype == torch.float32  # restored after the block


def _three_blocks(lin, x, precision="bfloat16"):
    out = []
    for _ in range(3):
        with autocast(precision, "cpu"):
            out.append(lin(x))
    return out


def test_reuse_casts_casts_each_weight_once_and_changes_nothing_else():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with WeightCasts() as counted:
        plain = _three_blocks(lin, x)
    assert counted.n == 6  # weight and bias, once per autocast block
    with WeightCasts() as counted, reuse_casts("bfloat16"):
        assert not torch.is_autocast_enabled("cpu")  # enables nothing by itself
        reused = _three_blocks(lin, x)
    assert counted.n == 2
    for a, b in zip(plain, reused):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
    # float32 keeps nothing
    with WeightCasts() as counted, reuse_casts("float32"):
        _three_blocks(lin, x)
    assert counted.n == 6


def test_reuse_casts_drops_the_copies_at_its_end():
    # a weight changed after the block is cast again: no stale low-precision copy survives
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with reuse_casts("bfloat16"):
        before = _three_blocks(lin, x)[0]
    with torch.no_grad():
        lin.weight.mul_(-1)
    with autocast("bfloat16", "cpu"):
        after = lin(x)
    assert not torch.equal(before, after)
    # leaving the block after an error also drops them
    with pytest.raises(KeyError), reuse_casts("bfloat16"):
        _three_blocks(lin, x)
        raise KeyError
    with torch.no_grad():
        lin.weight.mul_(-1)
    with autocast("bfloat16", "cpu"):
        assert torch.equal(lin(x), before)


def test_grad_scaler_only_for_float16():
    from skdebias._utils._runtime import grad_scaler

    assert grad_scaler("float32", "cpu") is None
    assert grad_scaler("bfloat16", "cpu") is None
    assert isinstance(grad_scaler("float16", "cuda"), torch.amp.GradScaler)
