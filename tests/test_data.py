"""bastion.data: every reader on tiny real-format fixture files; errors name the file and layout."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from bastion.data import DATASETS, ImageDataset, check_images, load_dataset, resize
from bastion.errors import DataError


def _assert_images(ds: ImageDataset, shape: tuple[int, int, int], n: int, num_classes: int) -> None:
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert tuple(ds.images.shape) == (n, *shape)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert len(ds.class_names) == num_classes and ds.num_classes == num_classes
    assert ds.input_shape == shape and len(ds) == n
    assert torch.equal(ds.indices, torch.arange(n))
    check_images(ds.images)


# --- digits / synthetic -------------------------------------------------------------------------

def test_digits_split_is_stratified_seeded_and_disjoint():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    _assert_images(tr, (1, 8, 8), 1347, 10)
    _assert_images(te, (1, 8, 8), 450, 10)
    assert tr.class_names == [str(i) for i in range(10)]
    # stratified: every class keeps ~25% of its examples in test
    counts_te = torch.bincount(te.labels, minlength=10).float()
    counts_all = counts_te + torch.bincount(tr.labels, minlength=10).float()
    assert torch.allclose(counts_te / counts_all, torch.full((10,), 0.25), atol=0.01)
    # disjoint: no test image equals a train image at the same (image, label) -- compare as a set of bytes
    all_imgs = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(tr.images, tr.labels)}
    overlap = sum((bytes(x.numpy().tobytes()), int(y)) in all_imgs for x, y in zip(te.images, te.labels))
    assert overlap < 5  # load_digits has a handful of exact duplicates, nothing more
    # seeded
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, te.images) and torch.equal(again.labels, te.labels)
    other = load_dataset("digits", "test", seed=1)
    assert not torch.equal(other.labels, te.labels)


@pytest.mark.parametrize("size", [16, 32])
def test_digits_resize(size):
    ds = load_dataset("digits", "test", image_size=size, num_examples=5)
    _assert_images(ds, (1, size, size), 5, 10)
    base = load_dataset("digits", "test", num_examples=5)
    # integer upsampling is nearest: each pixel becomes a constant block
    k = size // 8
    assert torch.equal(ds.images[:, :, ::k, ::k], base.images)


def test_synthetic_is_seeded_and_learnable_shape():
    a = load_dataset("synthetic", "train", seed=3, num_examples_total=40, num_classes=5, channels=3, size=6)
    b = load_dataset("synthetic", "train", seed=3, num_examples_total=40, num_classes=5, channels=3, size=6)
    c = load_dataset("synthetic", "test", seed=3, num_examples_total=40, num_classes=5, channels=3, size=6)
    _assert_images(a, (3, 6, 6), 40, 5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert set(a.labels.tolist()) == set(range(5))


def test_subset_every_keep_dataset_indices():
    ds = load_dataset("synthetic", "test", num_examples_total=20)
    sub = ds.every(skip=3, max_examples=4, start=1)
    assert sub.indices.tolist() == [1, 4, 7, 10]
    assert torch.equal(sub.images, ds.images[[1, 4, 7, 10]])
    assert sub.subset([1, 2]).indices.tolist() == [4, 7]


def test_unknown_dataset_split_option():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("digits", "val")
    with pytest.raises(DataError, match="no option"):
        load_dataset("digits", "train", colour=True)
    for name in ("mnist", "cifar10", "cifar100", "imagefolder"):
        with pytest.raises(DataError, match="pass root"):
            load_dataset(name, "train")
    assert set(DATASETS) == {"digits", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"}


def test_check_images():
    check_images(torch.rand(2, 1, 4, 4))
    for bad, msg in [(torch.rand(2, 4, 4), "shape"), (torch.full((1, 1, 2, 2), 1.5), r"\[0, 1\]"),
                     (torch.full((1, 1, 2, 2), float("nan")), "NaN"), (torch.zeros(1, 1, 2, 2, dtype=torch.uint8),
                                                                       "floating")]:
        with pytest.raises(DataError, match=msg):
            check_images(bad)


def test_resize_bilinear_non_integer_factor_stays_in_range():
    x = torch.rand(3, 2, 8, 8)
    y = resize(x, 12)
    assert y.shape == (3, 2, 12, 12) and y.min() >= 0 and y.max() <= 1


# --- MNIST (IDX files) --------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def _write_mnist(root, n_train=6, n_test=4, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        files[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, (n,), dtype=np.uint8)
    for name, arr in files.items():
        if gz:
            with gzip.open(root / (name + ".gz"), "wb") as f:
                f.write(_idx_bytes(arr))
        else:
            (root / name).write_bytes(_idx_bytes(arr))
    return files


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files(tmp_path, gz):
    files = _write_mnist(tmp_path, gz=gz)
    for split, prefix, n in (("train", "train", 6), ("test", "t10k", 4)):
        ds = load_dataset("mnist", split, root=tmp_path)
        _assert_images(ds, (1, 28, 28), n, 10)
        assert torch.equal(ds.labels, torch.from_numpy(files[f"{prefix}-labels-idx1-ubyte"].astype(np.int64)))
        expect = torch.from_numpy(files[f"{prefix}-images-idx3-ubyte"].astype(np.float32) / 255)
        assert torch.equal(ds.images[:, 0], expect)
    ds = load_dataset("mnist", "test", root=tmp_path, image_size=32, num_examples=2)
    _assert_images(ds, (1, 32, 32), 2, 10)


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_mnist(raw, gz=False)
    assert len(load_dataset("mnist", "train", root=tmp_path)) == 6


def test_mnist_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*expected layout"):
        load_dataset("mnist", "train", root=tmp_path)
    files = _write_mnist(tmp_path, gz=False)
    img = tmp_path / "t10k-images-idx3-ubyte"
    img.write_bytes(_idx_bytes(files["t10k-images-idx3-ubyte"])[:-7])  # truncated
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*expected layout"):
        load_dataset("mnist", "test", root=tmp_path)
    img.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 40)  # wrong dtype code in the magic
    with pytest.raises(DataError, match="malformed IDX.*t10k-images"):
        load_dataset("mnist", "test", root=tmp_path)
    img.write_bytes(b"\x00")  # too short for a header
    with pytest.raises(DataError, match="malformed IDX"):
        load_dataset("mnist", "test", root=tmp_path)
    img.unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    with pytest.raises(DataError, match="malformed IDX.*t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", root=tmp_path)
    # label count mismatch
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    with pytest.raises(DataError, match="3 images but 4 labels"):
        load_dataset("mnist", "test", root=tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", "test", root=tmp_path / "nope")


# --- CIFAR (python pickle batches) --------------------------------------------------------------

def _cifar_batch(n, label_key, seed, num_classes):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", label_key: rng.integers(0, num_classes, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_pickle_batches(tmp_path, protocol):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(3, b"labels", i, 10)
        (base / name).write_bytes(pickle.dumps(batches[name], protocol=protocol))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=protocol))
    tr = load_dataset("cifar10", "train", root=tmp_path)
    _assert_images(tr, (3, 32, 32), 15, 10)
    assert tr.class_names[0] == "airplane" and tr.class_names[-1] == "truck"
    te = load_dataset("cifar10", "test", root=tmp_path)
    _assert_images(te, (3, 32, 32), 3, 10)
    b = batches["test_batch"]
    assert te.labels.tolist() == b[b"labels"]
    # CIFAR rows are R plane, G plane, B plane, each 32x32 row-major
    assert torch.equal(te.images, torch.from_numpy(b[b"data"].reshape(3, 3, 32, 32).astype(np.float32) / 255))


def test_cifar10_str_keys_and_flat_root(tmp_path):
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        b = {k.decode(): v for k, v in _cifar_batch(2, b"labels", 0, 10).items()}
        (tmp_path / name).write_bytes(pickle.dumps(b))
    ds = load_dataset("cifar10", "test", root=tmp_path, image_size=16)
    _assert_images(ds, (3, 16, 16), 2, 10)


def test_cifar100_reads_pickle_batches(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        b = _cifar_batch(n, b"fine_labels", n, 100)
        b[b"coarse_labels"] = [0] * n
        (base / split).write_bytes(pickle.dumps(b))
    fine = [f"c{i}".encode() for i in range(100)]
    (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": fine, b"coarse_label_names": [b"x"] * 20}))
    tr = load_dataset("cifar100", "train", root=tmp_path)
    _assert_images(tr, (3, 32, 32), 5, 100)
    assert tr.class_names[:2] == ["c0", "c1"]
    assert len(load_dataset("cifar100", "test", root=tmp_path)) == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_cifar_restricted_unpickler_refuses_other_globals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"x": _Evil()}
    (base / "train").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match=r"cifar-100-python/train.*refusing.*(posix|os|nt)\.system.*expected layout"):
        load_dataset("cifar100", "train", root=tmp_path)
    assert not (tmp_path / "PWNED_MARKER").exists()
    # a class from an allowed module but not on the allow-list is refused too
    (base / "train").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0],
                                               b"y": np.random.default_rng(0)}))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar100", "train", root=tmp_path)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.*expected layout.*cifar-10-batches-py"):
        load_dataset("cifar10", "train", root=tmp_path)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    good = pickle.dumps(_cifar_batch(2, b"fine_labels", 0, 100))
    (base / "test").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="malformed CIFAR batch.*cifar-100-python/test.*expected layout"):
        load_dataset("cifar100", "test", root=tmp_path)
    (base / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="malformed CIFAR batch"):
        load_dataset("cifar100", "test", root=tmp_path)
    (base / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(DataError, match=r"malformed CIFAR batch.*\(2, 100\)"):
        load_dataset("cifar100", "test", root=tmp_path)
    (base / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataError, match="no 'data'/'fine_labels' entry"):
        load_dataset("cifar100", "test", root=tmp_path)
    (base / "test").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="expected a pickled dict"):
        load_dataset("cifar100", "test", root=tmp_path)
    (base / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]}))
    with pytest.raises(DataError, match=r"labels.*\[0, 100\)"):
        load_dataset("cifar100", "test", root=tmp_path)


# --- imagefolder --------------------------------------------------------------------------------

def _png(path, size, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_reads_class_folders(tmp_path):
    _png(tmp_path / "train" / "cat" / "a.png", (8, 8), (255, 0, 0))
    _png(tmp_path / "train" / "cat" / "b.png", (8, 8), (255, 0, 0))
    _png(tmp_path / "train" / "dog" / "a.png", (8, 8), (0, 0, 255))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    _png(tmp_path / "test" / "cat" / "c.png", (8, 8), (0, 255, 0))
    _png(tmp_path / "test" / "dog" / "d.png", (8, 8), (0, 255, 0))
    tr = load_dataset("imagefolder", "train", root=tmp_path)
    _assert_images(tr, (3, 8, 8), 3, 2)
    assert tr.class_names == ["cat", "dog"] and tr.labels.tolist() == [0, 0, 1]
    assert torch.equal(tr.images[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(tr.images[2, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    gray = load_dataset("imagefolder", "test", root=tmp_path, channels=1)
    _assert_images(gray, (1, 8, 8), 2, 2)


def test_imagefolder_mixed_sizes_need_and_use_image_size(tmp_path):
    _png(tmp_path / "a" / "1.png", (8, 8), (10, 20, 30))
    _png(tmp_path / "b" / "1.png", (12, 6), (200, 100, 0))
    with pytest.raises(DataError, match="different sizes.*image_size"):
        load_dataset("imagefolder", "train", root=tmp_path)
    ds = load_dataset("imagefolder", "train", root=tmp_path, image_size=16)  # no split folders: ROOT/<class>
    _assert_images(ds, (3, 16, 16), 2, 2)
    assert torch.allclose(ds.images[1, :, 5, 5], torch.tensor([200, 100, 0]) / 255.0, atol=1e-6)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="no class folders.*expected layout"):
        load_dataset("imagefolder", "train", root=tmp_path)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no 'test' folder"):
        load_dataset("imagefolder", "test", root=tmp_path)
    with pytest.raises(DataError, match="no image files"):
        load_dataset("imagefolder", "train", root=tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="cannot read image.*broken.png"):
        load_dataset("imagefolder", "train", root=tmp_path)
