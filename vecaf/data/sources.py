"""Data sources for the image pool: Fashion-MNIST, scikit-learn digits, CIFAR-10/100, ImageFolder.

Every source gives an :class:`~vecaf.data.dataset.ImageDataset` with stable ids, string class names and
labels checked against them. Nothing is cached or written outside a folder the caller names.

- ``fashion-mnist``: the idx files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``) from ``root``,
  ``root/FashionMNIST/raw`` (torchvision's layout), or by default the Debian package
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist); ``download=True`` fetches them into
  ``root`` with torchvision. Splits train (60 000) / test (10 000). Ids ``fashion-mnist/<split>/<00042>``.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, grey levels 0..16 scaled to 0..255). It has
  no official split: ``test`` is every fifth image (index % 5 == 0, 360 images), ``train`` the rest
  (1437), ``all`` everything. Ids ``digits/<0042>`` (index in the full set, the same in every split).
  Class names "digit 0".."digit 9" (strings that read well inside a caption).
- ``cifar10`` / ``cifar100``: the python batches (CIFAR-10: ``data_batch_1..5``, ``test_batch``,
  ``batches.meta``; CIFAR-100: ``train``, ``test``, ``meta`` with the 100 fine labels) in ``root`` or in
  the folder the archive extracts to (``cifar-10-batches-py``, ``cifar-100-python``); ``download=True``
  fetches them with torchvision. They are unpickled with only numpy's array constructors allowed.
  Ids ``cifar10/<split>/<00042>`` in batch order.
- ``imagefolder``: ``root/<class name>/**/<image>`` (or ``root/<split>/<class name>/...`` when that
  folder exists), classes sorted by folder name. Every candidate image is decoded once when the dataset
  is built: an unreadable or truncated file is skipped, recorded in ``dataset.skipped`` and reported in a
  warning, or with ``strict=True`` raises. Ids ``imagefolder/<path relative to root>``.

``limit`` keeps a seeded stratified subset (``dataset.subset_indices``); for an ImageFolder the subset is
filled in the stratified order with images that decode, so a skipped file does not shrink it.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vecaf.data.dataset import ArrayImageDataset, FileImageDataset, ImageDataset, stratified_order, subset_indices
from vecaf.settings import FASHION_MNIST_DEBIAN_DIR

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGITS_CLASSES = [f"digit {d}" for d in range(10)]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder")
_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "image-folder": "imagefolder",
    "image_folder": "imagefolder",
}
_SPLITS = {
    "fashion-mnist": ("train", "test"),
    "digits": ("train", "test", "all"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
}


def list_datasets() -> list[str]:
    """The dataset names :func:`load_dataset` knows."""
    return list(_DATASETS)


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    split: str = "train",
    strict: bool = False,
    limit: int | None = None,
    download: bool = False,
    seed: int = 0,
) -> ImageDataset:
    """Load an image pool by name.

    Args:
        name: one of :func:`list_datasets` ("fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder").
        root: the data folder (the class-subfolder root for "imagefolder", the batches folder for CIFAR,
            the idx folder for Fashion-MNIST; None uses the Debian package for Fashion-MNIST). Not used by
            "digits".
        split: "train" or "test" ("all" too for digits; any subfolder name, or the root itself, for an
            ImageFolder).
        strict: raise on an unreadable image instead of skipping and reporting it (ImageFolder).
        limit: keep a seeded stratified subset of this many images (None: all).
        download: fetch Fashion-MNIST or CIFAR into ``root`` with torchvision where the network allows.
        seed: the seed of the ``limit`` subset.

    Returns:
        The :class:`ImageDataset`.

    Raises:
        ValueError: unknown name (the known ones are listed) or split, an empty folder, a label outside
            the class list, a corrupt image with ``strict=True``, malformed data files.
        FileNotFoundError: the data is absent and cannot be obtained; the message says how to get it.
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_DATASETS)}")
    if key in _SPLITS and split not in _SPLITS[key]:
        raise ValueError(f"dataset {key} has no split {split!r}; its splits: {', '.join(_SPLITS[key])}")
    if download and root is None and key != "digits":
        raise ValueError(f"download=True needs root=<folder> to download {key} into (nothing is cached elsewhere)")
    root_path = Path(root).expanduser() if root is not None else None
    if key == "fashion-mnist":
        return _fashion_mnist(root_path, split, limit=limit, download=download, seed=seed)
    if key == "digits":
        return _digits(split, limit=limit, seed=seed)
    if key in ("cifar10", "cifar100"):
        return _cifar(key, root_path, split, limit=limit, download=download, seed=seed)
    return _image_folder(root_path, split, strict=strict, limit=limit, seed=seed)


def _array_subset(
    name: str, split: str, ids: list[str], images: np.ndarray, labels: np.ndarray, classes: list[str], **kw: Any
) -> ArrayImageDataset:
    limit, seed, root = kw.pop("limit"), kw.pop("seed"), kw.pop("root", None)
    keep = subset_indices(labels, limit, seed=seed)
    if len(keep) == len(ids):
        return ArrayImageDataset(images, name=name, split=split, ids=ids, labels=labels, class_names=classes, root=root)
    return ArrayImageDataset(
        images[keep],
        name=name,
        split=split,
        ids=[ids[i] for i in keep],
        labels=labels[keep],
        class_names=classes,
        root=root,
    )


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain) as a uint8 array of its declared shape.

    The header is two zero bytes, the type code (0x08 = unsigned byte), the number of dimensions k, then k
    big-endian int32 sizes; the data follow.

    Raises:
        ValueError: a bad header, a type other than unsigned byte, or a truncated file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read idx file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: idx type code {raw[2]:#04x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated (header)")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path} is truncated or padded: shape {shape} needs {size} bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _idx_pair(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    for suffix in (".gz", ""):
        images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
        labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def _find_idx_folder(dirs: list[Path], prefix: str) -> Path | None:
    return next((d for d in dirs if _idx_pair(d, prefix) is not None), None)


def _fashion_mnist(root: Path | None, split: str, *, limit: int | None, download: bool, seed: int) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    if root is None:
        dirs = [FASHION_MNIST_DEBIAN_DIR]
    else:
        dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    folder = _find_idx_folder(dirs, prefix)
    if folder is None and download:
        _torchvision_download("FashionMNIST", root, split)
        folder = _find_idx_folder(dirs, prefix)
    if folder is None:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files ({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz) not found in "
            f"{', '.join(str(d) for d in dirs)}. Get them with `sudo apt-get install dataset-fashion-mnist` "
            f"(installs {FASHION_MNIST_DEBIAN_DIR}), or copy them from "
            "https://github.com/zalandoresearch/fashion-mnist into a folder and pass root=<folder>, or pass "
            "root=<folder> and download=True where the network allows (torchvision)."
        )
    pair = _idx_pair(folder, prefix)
    assert pair is not None
    images_path, labels_path = pair
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST in {folder}: images {images.shape} and labels {labels.shape} do not pair up")
    ids = [f"fashion-mnist/{split}/{i:05d}" for i in range(len(labels))]
    return _array_subset(
        "fashion-mnist", split, ids, images, labels.astype(np.int64), FASHION_MNIST_CLASSES,
        limit=limit, seed=seed, root=folder,
    )  # fmt: skip


def _digits(split: str, *, limit: int | None, seed: int) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    keep = {"all": index, "test": index[index % 5 == 0], "train": index[index % 5 != 0]}[split]
    ids = [f"digits/{i:04d}" for i in keep]
    return _array_subset("digits", split, ids, images[keep], labels[keep], DIGITS_CLASSES, limit=limit, seed=seed)


class _ArrayUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a readable CIFAR python batch: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR python batch (expected a dict, got {type(obj).__name__})")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _as_str(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


_CIFAR: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "label_key": "labels",
        "torchvision": "CIFAR10",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "label_key": "fine_labels",
        "torchvision": "CIFAR100",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


def _find_cifar_folder(dirs: list[Path], spec: dict[str, Any], split: str) -> Path | None:
    needed = [*spec[split], spec["meta"][0]]
    return next((d for d in dirs if all((d / f).is_file() for f in needed)), None)


def _cifar(key: str, root: Path | None, split: str, *, limit: int | None, download: bool, seed: int) -> ImageDataset:
    spec = _CIFAR[key]
    dirs = [root, root / spec["folder"]] if root is not None else []
    folder = _find_cifar_folder(dirs, spec, split)
    if folder is None and download:
        _torchvision_download(spec["torchvision"], root, split)
        folder = _find_cifar_folder(dirs, spec, split)
    if folder is None:
        files = ", ".join([*spec[split], spec["meta"][0]])
        where = ", ".join(str(d) for d in dirs) if dirs else "no root given"
        raise FileNotFoundError(
            f"{key} python batches ({files}) not found ({where}). Download {spec['url']}, extract it and pass "
            f"root=<the extracted {spec['folder']} folder or its parent>, or pass root=<folder> and "
            "download=True where the network allows (torchvision)."
        )
    meta_file, meta_key = spec["meta"]
    meta = _read_cifar_pickle(folder / meta_file)
    if meta_key not in meta:
        raise ValueError(f"{folder / meta_file} has no {meta_key!r} entry (keys: {sorted(meta)})")
    classes = [_as_str(c) for c in meta[meta_key]]
    chunks, labels = [], []
    for batch_name in spec[split]:
        batch = _read_cifar_pickle(folder / batch_name)
        if "data" not in batch or spec["label_key"] not in batch:
            raise ValueError(f"{folder / batch_name} lacks 'data' or {spec['label_key']!r} (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder / batch_name}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        batch_labels = np.asarray(batch[spec["label_key"]])
        if len(batch_labels) != len(data):
            raise ValueError(f"{folder / batch_name}: {len(data)} images but {len(batch_labels)} labels")
        chunks.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    images = np.ascontiguousarray(np.concatenate(chunks))
    label_array = np.concatenate(labels)
    if not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"{key} in {folder}: labels must be integers, got dtype {label_array.dtype}")
    ids = [f"{key}/{split}/{i:05d}" for i in range(len(images))]
    labels64 = label_array.astype(np.int64)
    return _array_subset(key, split, ids, images, labels64, classes, limit=limit, seed=seed, root=folder)


def _torchvision_download(cls_name: str, root: Path | None, split: str) -> None:
    import torchvision.datasets as tvd

    assert root is not None
    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(tvd, cls_name)(root=str(root), train=(split == "train"), download=True)
    except Exception as exc:
        raise FileNotFoundError(
            f"downloading {cls_name} into {root} with torchvision failed ({type(exc).__name__}: {exc}); the network "
            "may be cut. Copy the files into root by hand (see the error without download=True for where to get them)."
        ) from exc


def _decode_error(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _image_folder(root: Path | None, split: str, *, strict: bool, limit: int | None, seed: int) -> ImageDataset:
    if root is None:
        raise ValueError("dataset imagefolder needs root=<folder holding one subfolder per class>")
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; create it with one subfolder per class holding that class's images"
        )
    base = root / split if split and (root / split).is_dir() and _subdirs(root / split) else root
    used_split = split if base != root else "all"
    classes = _subdirs(base)
    if not classes:
        raise ValueError(
            f"image folder {base} is empty or has no class subfolders; expected {base}/<class name>/<image files>"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for path in sorted((base / cls).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ValueError(
            f"image folder {base} has class subfolders ({', '.join(classes)}) but no image files "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    label_array = np.asarray(labels, dtype=np.int64)
    target = len(paths) if limit is None else len(subset_indices(label_array, limit, seed=seed))
    order = np.arange(len(paths)) if limit is None else stratified_order(label_array, seed=seed)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i in order:
        if len(kept) == target:
            break
        reason = _decode_error(paths[i])
        if reason is None:
            kept.append(int(i))
            continue
        if strict:
            raise ValueError(f"cannot decode image {paths[i]}: {reason} (strict mode; strict=False skips such files)")
        skipped.append((str(paths[i]), reason))
    if skipped:
        log.warning(
            "image folder %s: skipped %d unreadable image(s) of %d, first %s (%s); see dataset.skipped",
            base, len(skipped), len(paths), skipped[0][0], skipped[0][1],
        )  # fmt: skip
    if not kept:
        raise ValueError(f"image folder {base}: none of its {len(paths)} image files can be decoded")
    kept.sort()
    return FileImageDataset(
        [paths[i] for i in kept],
        name="imagefolder",
        split=used_split,
        ids=[f"imagefolder/{paths[i].relative_to(root).as_posix()}" for i in kept],
        labels=label_array[kept],
        class_names=classes,
        skipped=skipped,
        root=base,
    )


def _subdirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
