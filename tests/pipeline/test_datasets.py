"""Vision tasks: offline loaders, subsets, files, and torchvision's on-disk formats.

The torchvision tasks are tested with small files written here in the formats
torchvision reads (MNIST/EMNIST idx-ubyte, CIFAR-10 python batches); no network.
"""
from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pipeline import datasets
from pipeline.datasets import TASKS, DatasetError

OFFLINE = [("mnist5k", (1, 28, 28), 10), ("digits", (1, 8, 8), 10), ("mnist1d", (1, 40), 10)]


def _row_set(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def _assert_well_formed(data, shape, classes, n_train, n_eval):
    assert data.train_x.shape == (n_train, *shape) and data.eval_x.shape == (n_eval, *shape)
    assert data.train_x.dtype == torch.float32 and data.eval_x.dtype == torch.float32
    assert data.train_y.shape == (n_train,) and data.eval_y.shape == (n_eval,)
    assert data.train_y.dtype == torch.int64 and data.eval_y.dtype == torch.int64
    assert int(data.train_y.min()) >= 0 and int(data.train_y.max()) < classes
    assert torch.isfinite(data.train_x).all() and torch.isfinite(data.eval_x).all()
    assert data.num_classes == classes and data.input_shape == shape


@pytest.mark.parametrize("name,shape,classes", OFFLINE)
def test_offline_task_loads_disjoint_subsets(name, shape, classes):
    task = TASKS[name]
    assert (task.input_shape, task.num_classes) == (shape, classes)
    data = task.load(train_samples=300, eval_samples=200, seed=0)
    _assert_well_formed(data, shape, classes, 300, 200)
    # disjoint: no training example appears in the evaluation subset
    assert not _row_set(data.train_x) & _row_set(data.eval_x)
    # normalized with the training subset's statistics
    assert abs(float(data.train_x.mean())) < 1e-3 and abs(float(data.train_x.std()) - 1) < 1e-2
    assert len(data.train_y.unique()) == classes  # 300 shuffled samples cover every class


@pytest.mark.parametrize("name", [n for n, _, _ in OFFLINE])
def test_offline_task_is_deterministic_for_a_seed(name):
    a = TASKS[name].load(train_samples=100, eval_samples=50, seed=7)
    b = TASKS[name].load(train_samples=100, eval_samples=50, seed=7)
    c = TASKS[name].load(train_samples=100, eval_samples=50, seed=8)
    for k in ("train_x", "train_y", "eval_x", "eval_y"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert not torch.equal(a.train_x, c.train_x)


def test_mnist1d_leaves_global_random_state_alone():
    import random
    np.random.seed(123)
    random.seed(123)
    TASKS["mnist1d"].load(train_samples=20, eval_samples=20, seed=0)
    after_np, after_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    assert (np.random.rand(), random.random()) == (after_np, after_py)


def test_sizes_are_clamped_to_what_exists():
    data = TASKS["digits"].load(train_samples=1500, eval_samples=1500, seed=0)  # 1797 images
    assert len(data.train_y) + len(data.eval_y) == 1797
    assert abs(len(data.train_y) - len(data.eval_y)) <= 1  # equal asks, equal shares
    assert not _row_set(data.train_x) & _row_set(data.eval_x)


def test_too_small_requests_are_refused():
    with pytest.raises(DatasetError):
        TASKS["digits"].load(train_samples=0, eval_samples=10, seed=0)
    with pytest.raises(DatasetError):
        datasets._clamp_pool("tiny", 1, 10, 10)


def test_unknown_task():
    with pytest.raises(DatasetError, match="unknown task"):
        datasets.get_task("imagenet")


def test_save_and_load_file_roundtrip(tmp_path):
    data = TASKS["digits"].load(train_samples=64, eval_samples=32, seed=1)
    path = tmp_path / "digits.safetensors"
    datasets.save(data, path)
    # one safetensors file with exactly the contract's tensors
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"train_x", "train_y", "eval_x", "eval_y"}
    back = datasets.load_file(path)
    assert (back.name, back.num_classes) == ("digits", 10)
    for k in ("train_x", "train_y", "eval_x", "eval_y"):
        assert torch.equal(getattr(back, k), getattr(data, k))


def test_load_file_refuses_an_incomplete_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "bad.safetensors"
    save_file({"train_x": torch.zeros(2, 1, 8, 8)}, str(path))
    with pytest.raises(DatasetError, match="missing"):
        datasets.load_file(path)


# ---- torchvision on-disk formats ---------------------------------------------------------

def _write_idx_images(path, images: np.ndarray):
    n, h, w = images.shape
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, n, h, w))  # uint8, 3 dims, big-endian
        f.write(images.astype(np.uint8).tobytes())


def _write_idx_labels(path, labels: np.ndarray):
    with open(path, "wb") as f:
        f.write(struct.pack(">II", 0x00000801, len(labels)))  # uint8, 1 dim
        f.write(labels.astype(np.uint8).tobytes())


def _fake_images(rng, n, label_values, shape):
    """Images whose first pixel encodes the label, so we can check labels stay paired."""
    labels = rng.choice(label_values, size=n)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = labels
    return images, labels


def _write_mnist(root, n_train=60, n_test=40, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = _fake_images(rng, n, np.arange(10), (28, 28))
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)


def _write_emnist(root, n_train=80, n_test=40, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = _fake_images(rng, n, np.arange(62), (28, 28))
        _write_idx_images(raw / f"emnist-byclass-{split}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"emnist-byclass-{split}-labels-idx1-ubyte", labels)


def _write_cifar10(root, per_batch=12, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        images, labels = _fake_images(rng, n, np.arange(10), (3, 32, 32))
        # CIFAR's python batches: a pickled dict, data as [N, 3072] uint8 in CHW order
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels.tolist(),
                         "data": images.reshape(n, -1), "filenames": [f"{i}.png" for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                                     "dog", "frog", "horse", "ship", "truck"]}, f)


WRITERS = {"mnist": (_write_mnist, (1, 28, 28), 10),
           "emnist": (_write_emnist, (1, 28, 28), 62),
           "cifar10": (_write_cifar10, (3, 32, 32), 10)}


@pytest.mark.parametrize("name", list(WRITERS))
def test_torchvision_task_reads_its_on_disk_format(tmp_path, name):
    write, shape, classes = WRITERS[name]
    write(tmp_path)
    task = TASKS[name]
    assert (task.input_shape, task.num_classes) == (shape, classes)
    data = task.load(tmp_path, train_samples=25, eval_samples=15, seed=0)
    _assert_well_formed(data, shape, classes, 25, 15)
    again = task.load(tmp_path, train_samples=25, eval_samples=15, seed=0)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.eval_y, data.eval_y)
    # the training subset comes from the train split, the evaluation one from the test
    # split: with these fake files the splits share no image
    assert not _row_set(data.train_x) & _row_set(data.eval_x)


@pytest.mark.parametrize("name", list(WRITERS))
def test_torchvision_labels_stay_paired_with_images(tmp_path, name, monkeypatch):
    write, shape, classes = WRITERS[name]
    write(tmp_path)
    # skip normalization so the first pixel (the label, by construction) can be read back
    monkeypatch.setattr(datasets, "_normalize", lambda a, b: (a, b))
    data = TASKS[name].load(tmp_path, train_samples=30, eval_samples=15, seed=3)
    for x, y in ((data.train_x, data.train_y), (data.eval_x, data.eval_y)):
        assert torch.equal(torch.round(x.reshape(len(x), -1)[:, 0] * 255).long(), y)


@pytest.mark.parametrize("name", list(WRITERS))
def test_torchvision_sizes_clamp_to_each_split(tmp_path, name):
    write, shape, classes = WRITERS[name]
    write(tmp_path)
    data = TASKS[name].load(tmp_path, train_samples=10_000, eval_samples=10_000, seed=0)
    n_train = {"mnist": 60, "emnist": 80, "cifar10": 60}[name]
    n_test = {"mnist": 40, "emnist": 40, "cifar10": 20}[name]
    assert (len(data.train_y), len(data.eval_y)) == (n_train, n_test)


@pytest.mark.parametrize("name", list(WRITERS))
def test_torchvision_missing_files_raise_dataset_error(tmp_path, name):
    with pytest.raises(DatasetError, match="--download"):
        TASKS[name].load(None, train_samples=10, eval_samples=10, seed=0)
    with pytest.raises(DatasetError, match="--download"):
        TASKS[name].load(tmp_path / "nowhere", train_samples=10, eval_samples=10, seed=0)
    with pytest.raises(DatasetError, match=str(tmp_path)):  # the message says where to look
        TASKS[name].load(tmp_path, train_samples=10, eval_samples=10, seed=0)


def test_torchvision_partial_files_raise_dataset_error(tmp_path):
    _write_mnist(tmp_path)
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(DatasetError, match="MNIST/raw"):
        TASKS["mnist"].load(tmp_path, train_samples=10, eval_samples=10, seed=0)
