"""load_image_folder: class-per-folder images as arrays or as a Dataset."""

import numpy as np
import pytest
import torch
from PIL import Image

from skdebias.datasets import load_image_folder


def _write(path, color, size=(10, 12), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    for i in range(3):
        _write(root / "cat" / f"c{i}.png", (255, 0, 0))
        _write(root / "dog" / f"d{i}.png", (0, 0, 255))
    return root


def test_load_image_folder_rescales_16_bit_images(tmp_path):
    ramp = (np.arange(8, dtype=np.uint16) * 9362)[None].repeat(4, axis=0)  # 0 .. 65534
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(ramp).save(tmp_path / name / "x.png")
    assert Image.open(tmp_path / "a" / "x.png").mode.startswith("I")
    for grayscale in (False, True):
        data = load_image_folder(str(tmp_path), grayscale=grayscale)
        np.testing.assert_allclose(data.X[0, 0, 0], ramp[0] / 65535.0, atol=1 / 255)
        if not grayscale:
            np.testing.assert_array_equal(data.X[0, 0], data.X[0, 2])  # gray -> RGB


def test_load_image_folder(image_root):
    data = load_image_folder(str(image_root))
    assert data.X.shape == (6, 3, 12, 10)  # PIL size (w=10, h=12)
    assert data.X.dtype == np.float32 and data.X.min() >= 0 and data.X.max() <= 1
    assert data.y.dtype == np.int64
    np.testing.assert_array_equal(data.y, [0, 0, 0, 1, 1, 1])
    assert data.target_names == ["cat", "dog"]
    assert len(data.filenames) == 6 and all(f.endswith(".png") for f in data.filenames)
    assert "cat" in data.filenames[0]
    np.testing.assert_allclose(data.X[:3].mean((2, 3)), [[1, 0, 0]] * 3)  # red cats
    np.testing.assert_allclose(data.X[3:].mean((2, 3)), [[0, 0, 1]] * 3)  # blue dogs


def test_load_image_folder_resize_grayscale_path(image_root):
    assert load_image_folder(image_root, image_size=8).X.shape == (6, 3, 8, 8)
    assert load_image_folder(image_root, image_size=(6, 5)).X.shape == (6, 3, 6, 5)
    grey = load_image_folder(image_root, image_size=4, grayscale=True)
    assert grey.X.shape == (6, 1, 4, 4) and grey.X.dtype == np.float32
    assert 0 < grey.X.min() and grey.X.max() < 1  # luminance of red / blue


def test_load_image_folder_dataset(image_root):
    ds = load_image_folder(image_root, image_size=8, return_dataset=True)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[4]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert tuple(x.shape) == (3, 8, 8) and y == 1
    assert 0 <= x.min() and x.max() <= 1


def test_load_image_folder_mixed_sizes_and_formats(image_root):
    _write(image_root / "dog" / "big.jpg", (0, 0, 255), size=(20, 16), fmt="JPEG")
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(image_root)
    data = load_image_folder(image_root, image_size=(12, 10))
    assert data.X.shape == (7, 3, 12, 10)
    assert any(f.endswith(".jpg") for f in data.filenames)


def test_load_image_folder_errors(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_image_folder(missing)
    with pytest.raises(ValueError, match="No images found"):
        load_image_folder(tmp_path)  # empty
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="No images found"):
        load_image_folder(tmp_path)  # a class folder without images
    _write(tmp_path / "cls" / "a.png", (0, 255, 0))
    for bad in (0, -3, 2.5, (8,), (8, 8, 8), "8"):
        with pytest.raises(ValueError, match="image_size must be"):
            load_image_folder(tmp_path, image_size=bad)


def test_load_image_folder_skips_hidden_folders(image_root):
    _write(image_root / ".ipynb_checkpoints" / "c0-checkpoint.png", (0, 255, 0))
    data = load_image_folder(str(image_root))
    assert data.target_names == ["cat", "dog"]
    assert len(data.y) == 6


def test_image_folder_dataset_pickles_for_worker_processes(image_root, tmp_path):
    import pickle
    import subprocess
    import sys

    ds = load_image_folder(str(image_root), return_dataset=True)
    path = tmp_path / "ds.pkl"
    path.write_bytes(pickle.dumps(ds))
    code = ("import pickle, sys; ds = pickle.load(open(sys.argv[1], 'rb')); "
            "print(len(ds), ds.classes, tuple(ds[0][0].shape))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "6 ['cat', 'dog'] (3, 12, 10)"
