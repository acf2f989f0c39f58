"""Data sets as in-memory tensors: float32 images in [0, 1], NCHW, int64 labels, class names.

Nothing here downloads. ``digits`` (scikit-learn's embedded load_digits) is the default;
``mnist``, ``cifar10``, ``cifar100`` and ``imagefolder`` read their standard on-disk formats under
``root``; ``synthetic`` is seeded random data for tests.
"""

from __future__ import annotations

import gzip
import inspect
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bastion.errors import DataError

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
SPLITS = ("train", "test")


@dataclass
class ImageDataset:
    """``images`` (N, C, H, W) float32 in [0, 1]; ``labels`` (N,) int64; ``indices`` (N,) int64
    positions in the full split (so subsets keep their dataset indices)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    indices: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = torch.arange(len(self.labels), dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, positions: torch.Tensor | list[int] | slice) -> ImageDataset:
        """Rows at ``positions`` (positions in this object, not dataset indices)."""
        if isinstance(positions, slice):
            positions = torch.arange(len(self))[positions]
        pos = torch.as_tensor(positions, dtype=torch.int64)
        return ImageDataset(self.name, self.split, self.images[pos], self.labels[pos],
                            list(self.class_names), self.indices[pos])

    def every(self, skip: int = 1, max_examples: int | None = None, start: int = 0) -> ImageDataset:
        """Every ``skip``-th example (Cohen's --skip/--max convention), at most ``max_examples``."""
        pos = torch.arange(start, len(self), max(1, skip))
        if max_examples is not None:
            pos = pos[:max_examples]
        return self.subset(pos)


def check_images(x: torch.Tensor, what: str = "images") -> None:
    """Raise `DataError` unless ``x`` is a finite float tensor (N, C, H, W) with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise DataError(f"{what} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{what} must be floating point in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    if not torch.isfinite(x).all():
        raise DataError(f"{what} contain NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{what} must lie in [0, 1] (models normalize internally), "
                        f"got min {lo:.4g} max {hi:.4g}")


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, *,
                 image_size: int | None = None, seed: int = 0, num_examples: int | None = None,
                 **kwargs) -> ImageDataset:
    """Load a data set split.

    name: one of `DATASETS`. split: ``train`` or ``test``. root: folder holding the files
    (required for mnist/cifar10/cifar100/imagefolder). image_size: resize (nearest for upsampling
    by an integer factor, else bilinear) to image_size x image_size; imagefolder resizes each file
    as it is read, so folders of mixed sizes load. num_examples: keep the first n. Other keyword
    arguments go to the reader (digits: test_fraction; synthetic: num_examples_total,
    num_classes, channels, size; imagefolder: channels); an unknown one raises `DataError`.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    loaders = {"digits": _digits, "mnist": _mnist, "cifar10": _cifar10, "cifar100": _cifar100,
               "imagefolder": _imagefolder, "synthetic": _synthetic}
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                     or num_examples < 0):
        raise DataError(f"num_examples must be an integer >= 0, got {num_examples!r}")
    reader = loaders[name]
    accepted = set(inspect.signature(reader).parameters) - {"split", "root", "seed", "image_size"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise DataError(f"dataset {name!r} takes no option(s) {unknown}; it takes {sorted(accepted)}")
    if name in ("mnist", "cifar10", "cifar100", "imagefolder"):
        if root is None:
            raise DataError(f"dataset {name!r} reads local files: pass root=PATH (--data-root); "
                            f"nothing is downloaded")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"data root {str(root)!r} for {name!r} is not a directory")
        if name == "imagefolder":
            ds = _imagefolder(split, root, image_size=image_size, **kwargs)
        else:
            ds = reader(split, root, **kwargs)
    else:
        ds = reader(split, seed=seed, **kwargs)
    if image_size is not None and tuple(ds.images.shape[-2:]) != (image_size, image_size):
        ds.images = resize(ds.images, image_size)
    if num_examples is not None:
        ds = ds.subset(slice(0, num_examples))
    return ds


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) to size x size: nearest for integer upsampling, else bilinear, clamped."""
    h, w = images.shape[-2:]
    mode = "nearest" if size % h == 0 and size % w == 0 else "bilinear"
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": size < max(h, w)}
    return F.interpolate(images, size=(size, size), mode=mode, **kw).clamp(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------

def _digits(split: str, seed: int = 0, test_fraction: float = 0.25) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits, /16 -> [0, 1]; stratified seeded split (75/25)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise DataError(f"digits test_fraction must be in (0, 1), got {test_fraction!r}")
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    pick = np.sort(tr if split == "train" else te)
    return ImageDataset("digits", split, torch.from_numpy(x[pick]).contiguous(), torch.from_numpy(y[pick]),
                        [str(i) for i in range(10)])


def _synthetic(split: str, seed: int = 0, num_examples_total: int = 256, num_classes: int = 4,
               channels: int = 1, size: int = 8) -> ImageDataset:
    """Seeded, learnable toy data: each class a fixed random template plus noise, in [0, 1]."""
    g = torch.Generator().manual_seed(1000 + seed)
    templates = torch.rand((num_classes, channels, size, size), generator=g)
    g_split = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
    y = torch.arange(num_examples_total) % num_classes
    y = y[torch.randperm(num_examples_total, generator=g_split)]
    noise = torch.randn((num_examples_total, channels, size, size), generator=g_split)
    x = (templates[y] + 0.15 * noise).clamp(0, 1)
    return ImageDataset("synthetic", split, x.float(), y.long(), [f"class{i}" for i in range(num_classes)])


def _find(root: Path, names: list[str], layout: str) -> Path:
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                return cand
    raise DataError(f"missing data file {names[0]!r} (or .gz) under {str(root)!r}; "
                    f"expected layout: {layout}")


_MNIST_LAYOUT = ("ROOT/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                 "t10k-labels-idx1-ubyte (raw or .gz; ROOT may also be ROOT/MNIST/raw)")


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08 or ndim != expect_dims:
            raise ValueError("bad magic number")
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(dims)):
            raise ValueError(f"expected {int(np.prod(dims))} values, found {arr.size}")
        return arr.reshape(dims)
    except (OSError, EOFError, struct.error, ValueError, zlib.error) as exc:
        raise DataError(f"malformed IDX file {str(path)!r}: {exc}; expected layout: {_MNIST_LAYOUT}") from None


def _mnist(split: str, root: Path) -> ImageDataset:
    if (root / "MNIST" / "raw").is_dir():
        root = root / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    xi = _read_idx(_find(root, [f"{prefix}-images-idx3-ubyte"], _MNIST_LAYOUT), 3)
    yi = _read_idx(_find(root, [f"{prefix}-labels-idx1-ubyte"], _MNIST_LAYOUT), 1)
    if len(xi) != len(yi):
        raise DataError(f"MNIST {split}: {len(xi)} images but {len(yi)} labels under {str(root)!r}")
    _check_labels(yi, 10, str(root))
    x = torch.from_numpy(xi.astype(np.float32) / 255.0)[:, None].contiguous()
    return ImageDataset("mnist", split, x, torch.from_numpy(yi.astype(np.int64)), [str(i) for i in range(10)])


# The only globals a CIFAR batch (a pickle of plain dicts/lists/bytes and numpy arrays, written by
# Python 2 or 3 with any protocol) needs. Everything else is refused, so a crafted file cannot run code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol 2 written by Python 3 encodes bytes with it
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not part of the CIFAR format)")


def _unpickle_batch(path: Path, layout: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # anything a damaged or hostile pickle can raise
        raise DataError(f"malformed CIFAR batch {str(path)!r}: {type(exc).__name__}: {exc}; "
                        f"expected layout: {layout}") from None
    if not isinstance(obj, dict):
        raise DataError(f"malformed CIFAR batch {str(path)!r}: expected a pickled dict, got {type(obj).__name__}; "
                        f"expected layout: {layout}")
    return obj


def _cifar_arrays(batch: dict, path: Path, label_key: bytes, layout: str) -> tuple[np.ndarray, np.ndarray]:
    def get(key: bytes):
        return batch.get(key, batch.get(key.decode())) if isinstance(batch, dict) else None

    data, labels = get(b"data"), get(label_key)
    if data is None or labels is None:
        raise DataError(f"malformed CIFAR batch {str(path)!r}: no 'data'/{label_key.decode()!r} entry; "
                        f"expected layout: {layout}")
    try:
        data = np.asarray(data)
        labels = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"malformed CIFAR batch {str(path)!r}: {exc}; expected layout: {layout}") from None
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1
            or len(labels) != data.shape[0] or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"malformed CIFAR batch {str(path)!r}: data {data.dtype} {data.shape} (want uint8 "
                        f"(N, 3072)), labels {labels.dtype} {labels.shape} (want N integers); "
                        f"expected layout: {layout}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels in {where} must be in [0, {num_classes}), found {int(y.min())}..{int(y.max())}")


def _label_names(meta: dict, key: bytes) -> list[str] | None:
    names = meta.get(key, meta.get(key.decode()))
    if not names:
        return None
    return [c.decode() if isinstance(c, bytes) else str(c) for c in names]


_CIFAR10_LAYOUT = "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (python pickles)"
_CIFAR100_LAYOUT = "ROOT/cifar-100-python/{train, test, meta} (python pickles)"


def _cifar10(split: str, root: Path) -> ImageDataset:
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        p = _find(base, [n], _CIFAR10_LAYOUT)
        x, y = _cifar_arrays(_unpickle_batch(p, _CIFAR10_LAYOUT), p, b"labels", _CIFAR10_LAYOUT)
        xs.append(x)
        ys.append(y)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = base / "batches.meta"
    if meta.is_file():
        classes = _label_names(_unpickle_batch(meta, _CIFAR10_LAYOUT), b"label_names") or classes
    y = np.concatenate(ys)
    _check_labels(y, len(classes), str(base))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return ImageDataset("cifar10", split, x, torch.from_numpy(y), classes)


def _cifar100(split: str, root: Path) -> ImageDataset:
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    p = _find(base, [split], _CIFAR100_LAYOUT)
    x, y = _cifar_arrays(_unpickle_batch(p, _CIFAR100_LAYOUT), p, b"fine_labels", _CIFAR100_LAYOUT)
    classes = [str(i) for i in range(100)]
    meta = base / "meta"
    if meta.is_file():
        classes = _label_names(_unpickle_batch(meta, _CIFAR100_LAYOUT), b"fine_label_names") or classes
    _check_labels(y, len(classes), str(p))
    x_t = torch.from_numpy(x.astype(np.float32) / 255.0)
    return ImageDataset("cifar100", split, x_t, torch.from_numpy(y), classes)


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _imagefolder(split: str, root: Path, image_size: int | None = None, channels: int = 3) -> ImageDataset:
    """ROOT/{train,test}/<class>/<image> (or ROOT/<class>/<image> when there are no split folders)."""
    from PIL import Image, UnidentifiedImageError

    layout = "ROOT/{train,test}/<class_name>/<image files> (or ROOT/<class_name>/<image files>)"
    if channels not in (1, 3):
        raise DataError(f"imagefolder channels must be 1 or 3, got {channels!r}")
    has_splits = any((root / s).is_dir() for s in SPLITS)
    if has_splits and not (root / split).is_dir():
        raise DataError(f"no {split!r} folder under {str(root)!r} (it has split folders); expected layout: {layout}")
    base = root / split if has_splits else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders under {str(base)!r}; expected layout: {layout}")
    xs, ys = [], []
    mode = "L" if channels == 1 else "RGB"
    for ci, c in enumerate(classes):
        for f in sorted((base / c).iterdir()):
            if f.suffix.lower() not in _IMG_EXT:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if image_size is not None:
                        im = im.resize((image_size, image_size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {str(f)!r}: {exc}") from None
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(ci)
    if not xs:
        raise DataError(f"no image files under {str(base)!r}; expected layout: {layout}")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise DataError(f"images under {str(base)!r} have different sizes {sorted(shapes)[:3]}; "
                        f"pass image_size to resize them")
    return ImageDataset("imagefolder", split, torch.from_numpy(np.stack(xs)),
                        torch.tensor(ys, dtype=torch.int64), classes)
