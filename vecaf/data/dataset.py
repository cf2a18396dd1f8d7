"""The image-pool dataset type: (image_id, image, label) with stable ids and class names.

An :class:`ImageDataset` holds N images, each with an id that never changes between runs (``<dataset>/
<split>/<index>`` or ``imagefolder/<relative path>``), a label y_i in {0..C-1} and the C class names. It
yields ``(image_id, PIL.Image in RGB, label)``; :class:`TransformedDataset` turns the image into the PVM's
input tensor.

``limit`` picks a seeded stratified subset (:func:`stratified_order`): within each class c the samples
get a seeded random rank r = 0..n_c-1 and the key (r + 1/2) / n_c; sorting all samples by key (ties by
class index, then original index) and keeping the first ``limit`` gives every class about
limit * n_c / N samples (within one). The kept samples stay in their original order, so ids are sorted
as in the full dataset, and a smaller limit gives a subset of a larger one with the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def stratified_order(labels: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """All indices, ordered so that every prefix is a proportional stratified sample (see module doc).

    Args:
        labels: (N,) integer labels.
        seed: the seed of the within-class ranks.

    Returns:
        (N,) int64 permutation of 0..N-1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ranks = rng.permutation(len(members))
        keys[members] = (ranks + 0.5) / len(members)
    return np.lexsort((np.arange(len(labels)), labels, keys)).astype(np.int64)


def subset_indices(labels: np.ndarray, limit: int | None, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded stratified subset of ``limit`` samples (all when None or >= N).

    Raises:
        ValueError: ``limit`` is not a positive integer.
    """
    n = len(labels)
    if limit is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(stratified_order(labels, seed=seed)[:limit])


def check_class_names(class_names: Sequence[Any], *, what: str) -> list[str]:
    """A non-empty list of distinct strings, or a ``ValueError`` naming the problem."""
    names = list(class_names)
    if not names:
        raise ValueError(f"{what}: the class list is empty")
    for i, c in enumerate(names):
        if not isinstance(c, str):
            raise ValueError(f"{what}: class name {i} must be a str, got {type(c).__name__} {c!r}")
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise ValueError(f"{what}: class names must be distinct, repeated: {dupes}")
    return names


def check_labels(labels: Any, n_classes: int, ids: Sequence[str], *, what: str) -> np.ndarray:
    """(N,) int64 labels in 0..C-1, or a ``ValueError`` naming the first image with a bad label."""
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != len(ids):
        raise ValueError(f"{what}: expected {len(ids)} labels in a 1-D array, got shape {array.shape}")
    if len(array) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = np.flatnonzero((array < 0) | (array >= n_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{what}: label {int(array[i])} of image {ids[i]!r} is outside the class list (0..{n_classes - 1}); "
            f"{len(bad)} image(s) have such labels"
        )
    return array


class ImageDataset(torch.utils.data.Dataset):
    """A labelled image pool yielding ``(image_id, PIL image in RGB, label)``.

    Attributes:
        name: the source ("fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder").
        split: the split ("train", "test", "all"...).
        ids: N stable, distinct image ids.
        labels: (N,) int64 labels, each in 0..C-1.
        class_names: C distinct strings; label y names ``class_names[y]``.
        skipped: (path or id, reason) of every image left out because it could not be decoded.
        root: the folder the data came from (None for bundled data).
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        ids: Sequence[str],
        labels: Any,
        class_names: Sequence[Any],
        skipped: Sequence[tuple[str, str]] = (),
        root: Path | None = None,
    ) -> None:
        what = f"dataset {name}/{split}"
        self.name = name
        self.split = split
        self.ids = [str(i) for i in ids]
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"{what}: image ids must be distinct")
        self.class_names = check_class_names(class_names, what=what)
        self.labels = check_labels(labels, len(self.class_names), self.ids, what=what)
        self.skipped = list(skipped)
        self.root = root

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, Any, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        return self.ids[index], self.load_image(index), int(self.labels[index])

    def load_image(self, index: int) -> Any:
        """The index-th image as a PIL image in RGB mode."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """(C,) number of images per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def caption_class_names(self) -> list[str]:
        """The class name of every image, in order (what a captioner takes)."""
        return [self.class_names[y] for y in self.labels]

    def __repr__(self) -> str:
        extra = f", skipped={len(self.skipped)}" if self.skipped else ""
        return f"{type(self).__name__}({self.name}/{self.split}, n={len(self)}, classes={self.num_classes}{extra})"


class ArrayImageDataset(ImageDataset):
    """Images held in memory as a uint8 array (N, H, W) grey or (N, H, W, 3) RGB."""

    def __init__(self, images: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"dataset {self.name}: images must be uint8, got {images.dtype}")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise ValueError(f"dataset {self.name}: images must be (N, H, W) or (N, H, W, 3), got {images.shape}")
        if len(images) != len(self.ids):
            raise ValueError(f"dataset {self.name}: {len(images)} images but {len(self.ids)} ids")
        self.images = images

    def load_image(self, index: int) -> Any:
        from PIL import Image

        return Image.fromarray(self.images[index]).convert("RGB")


class FileImageDataset(ImageDataset):
    """Images read from files on demand (already checked to decode when the dataset was built)."""

    def __init__(self, paths: Sequence[Path], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(paths) != len(self.ids):
            raise ValueError(f"dataset {self.name}: {len(paths)} files but {len(self.ids)} ids")
        self.paths = [Path(p) for p in paths]

    def load_image(self, index: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")


class TransformedDataset(torch.utils.data.Dataset):
    """Wraps an :class:`ImageDataset`: yields ``(image_id, transform(image), label)``.

    Args:
        dataset: the image pool.
        transform: image -> tensor, e.g. ``pvm.transform()`` (RGB, the PVM's size and normalisation).
    """

    def __init__(self, dataset: ImageDataset, transform: Callable[[Any], torch.Tensor]) -> None:
        if not isinstance(dataset, ImageDataset):
            raise ValueError(f"TransformedDataset wraps an ImageDataset, got {type(dataset).__name__}")
        if not callable(transform):
            raise ValueError("transform must be callable (image -> tensor)")
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, int]:
        image_id, image, label = self.dataset[index]
        return image_id, self.transform(image), label

    @property
    def ids(self) -> list[str]:
        """The wrapped dataset's ids."""
        return self.dataset.ids

    @property
    def labels(self) -> np.ndarray:
        """The wrapped dataset's labels."""
        return self.dataset.labels

    @property
    def class_names(self) -> list[str]:
        """The wrapped dataset's class names."""
        return self.dataset.class_names
