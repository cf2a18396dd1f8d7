"""Data sources: ids, labels, class names, pixels checked against independent parsing; bad input."""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vecaf.data import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    ArrayImageDataset,
    ImageDataset,
    TransformedDataset,
    list_datasets,
    load_dataset,
    read_idx,
    stratified_order,
    subset_indices,
)
from vecaf.settings import FASHION_MNIST_DEBIAN_DIR

HAS_DEBIAN_FASHION = (FASHION_MNIST_DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file()


# ----------------------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_fake_fashion(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_fake_cifar10(folder: Path, *, per_batch: int = 4, bad_label: int | None = None) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"class{i}" for i in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 4})
    rows = []
    for b in range(1, 6):
        data = cifar_rows(per_batch, b)
        labels = [(b + i) % 10 for i in range(per_batch)]
        if bad_label is not None and b == 3:
            labels[1] = bad_label
        write_pickle(folder / f"data_batch_{b}", {b"data": data, b"labels": labels, b"batch_label": b"x"})
        rows.append(data)
    write_pickle(folder / "test_batch", {b"data": cifar_rows(3, 99), b"labels": [0, 1, 2]})
    return rows


# ------------------------------------------------------------------------------------------- registry


def test_list_datasets_names_every_source():
    assert list_datasets() == ["fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder"]


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet-22k")
    for known in list_datasets():
        assert known in str(err.value)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="no split 'val'.*train, test, all"):
        load_dataset("digits", split="val")


def test_download_without_root_is_an_error():
    with pytest.raises(ValueError, match="download=True needs root"):
        load_dataset("cifar10", download=True)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_splits_ids_labels_and_pixels():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = load_dataset("digits", split="all")
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    assert (len(full), len(train), len(test)) == (1797, 1437, 360)
    assert set(train.ids).isdisjoint(test.ids) and set(train.ids) | set(test.ids) == set(full.ids)
    assert full.class_names == DIGITS_CLASSES == [f"digit {d}" for d in range(10)]
    assert test.ids[:3] == ["digits/0000", "digits/0005", "digits/0010"]
    image_id, image, label = test[1]
    assert image_id == "digits/0005" and label == int(bunch.target[5])
    assert image.mode == "RGB" and image.size == (8, 8)
    pixels = np.asarray(image)
    for y in range(8):
        for x in range(8):
            expected = int(round(bunch.images[5][y, x] * 255 / 16))
            assert tuple(pixels[y, x]) == (expected, expected, expected)


def test_digits_ids_are_stable_between_loads():
    a, b = load_dataset("digits", limit=40, seed=3), load_dataset("digits", limit=40, seed=3)
    assert a.ids == b.ids and np.array_equal(a.labels, b.labels)


# ------------------------------------------------------------------------------------ stratified limit


def test_stratified_limit_is_proportional_nested_and_sorted():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(100))
    for k in range(1, 101):
        counts = np.bincount(labels[order[:k]], minlength=3)
        for c, n_c in zip(range(3), (60, 30, 10)):
            assert abs(counts[c] - k * n_c / 100) <= 1.0, (k, c, counts)
    small, large = subset_indices(labels, 10, seed=0), subset_indices(labels, 50, seed=0)
    assert set(small) <= set(large)
    assert list(small) == sorted(small)
    assert np.bincount(labels[small], minlength=3).tolist() == [6, 3, 1]
    assert not np.array_equal(subset_indices(labels, 10, seed=1), small)


def test_limit_bigger_than_the_data_keeps_all_and_bad_limit_fails():
    labels = np.array([0, 1, 1])
    assert subset_indices(labels, 10).tolist() == [0, 1, 2]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            subset_indices(labels, bad)


# --------------------------------------------------------------------------------- dataset invariants


def test_label_outside_the_class_list_is_an_error():
    with pytest.raises(ValueError, match=r"label 3 of image 'x/2' is outside the class list \(0..1\)"):
        ArrayImageDataset(
            np.zeros((3, 2, 2), np.uint8), name="x", split="all", ids=["x/0", "x/1", "x/2"],
            labels=[0, 1, 3], class_names=["a", "b"],
        )  # fmt: skip


def test_class_names_must_be_distinct_strings_and_ids_distinct():
    common = {"name": "x", "split": "all", "labels": [0, 0]}
    with pytest.raises(ValueError, match="class name 1 must be a str"):
        ArrayImageDataset(np.zeros((2, 2, 2), np.uint8), ids=["a", "b"], class_names=["a", 1], **common)
    with pytest.raises(ValueError, match="class names must be distinct"):
        ArrayImageDataset(np.zeros((2, 2, 2), np.uint8), ids=["a", "b"], class_names=["a", "a"], **common)
    with pytest.raises(ValueError, match="ids must be distinct"):
        ArrayImageDataset(np.zeros((2, 2, 2), np.uint8), ids=["a", "a"], class_names=["a"], **common)


def test_transformed_dataset_gives_the_pvm_input():
    from vecaf.models.pvm import PVMTransform

    pool = load_dataset("digits", split="test", limit=5)
    config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    wrapped = TransformedDataset(pool, PVMTransform(config))
    image_id, x, label = wrapped[0]
    assert image_id == pool.ids[0] and label == pool.labels[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert wrapped.ids == pool.ids and wrapped.class_names == pool.class_names
    with pytest.raises(ValueError, match="wraps an ImageDataset"):
        TransformedDataset([1, 2], lambda im: im)


# ------------------------------------------------------------------------------------------ idx files


def test_read_idx_parses_header_and_data(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "b"), array)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    array = np.ones((2, 3, 3), dtype=np.uint8)
    write_idx(tmp_path / "full", array, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "full").read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "png")


def test_fashion_mnist_from_a_folder_with_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.arange(12, dtype=np.uint8) % 10
    write_fake_fashion(tmp_path / "FashionMNIST" / "raw", "t10k", images, labels)
    pool = load_dataset("fashion-mnist", root=tmp_path, split="test")
    assert len(pool) == 12 and pool.class_names == FASHION_MNIST_CLASSES
    image_id, image, label = pool[11]
    assert image_id == "fashion-mnist/test/00011" and label == 1
    assert np.array_equal(np.asarray(image)[:, :, 0], images[11])


def test_fashion_mnist_label_outside_the_class_list(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    write_fake_fashion(tmp_path, "train", images, np.array([0, 10, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match="label 10 of image 'fashion-mnist/train/00001' is outside the class list"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", root=tmp_path)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message


@pytest.mark.skipif(not HAS_DEBIAN_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    pool = load_dataset("fashion-mnist", split="test")
    assert len(pool) == 10_000 and pool.class_counts().tolist() == [1000] * 10
    with gzip.open(FASHION_MNIST_DEBIAN_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(FASHION_MNIST_DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        raw_labels = f.read()
    assert struct.unpack(">iiii", raw[:16]) == (2051, 10_000, 28, 28)
    start = 16 + 42 * 28 * 28
    expected = np.frombuffer(raw[start : start + 28 * 28], dtype=np.uint8).reshape(28, 28)
    image_id, image, label = pool[42]
    assert image_id == "fashion-mnist/test/00042"
    assert label == raw_labels[8 + 42]
    assert np.array_equal(np.asarray(image)[:, :, 1], expected)
    subset = load_dataset("fashion-mnist", split="test", limit=50)
    assert subset.class_counts().tolist() == [5] * 10


# ---------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_batches_pixels_ids_and_class_names(tmp_path):
    rows = write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    pool = load_dataset("cifar10", root=tmp_path, split="train")
    assert len(pool) == 20 and pool.class_names == [f"class{i}" for i in range(10)]
    image_id, image, label = pool[5]
    assert image_id == "cifar10/train/00005" and label == (2 + 1) % 10
    row = rows[1][1]
    pixels = np.asarray(image)
    for y, x in [(0, 0), (3, 17), (31, 31)]:
        assert tuple(pixels[y, x]) == (row[y * 32 + x], row[1024 + y * 32 + x], row[2048 + y * 32 + x])
    test = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="test")
    assert test.ids == ["cifar10/test/00000", "cifar10/test/00001", "cifar10/test/00002"]


def test_cifar100_uses_fine_labels(tmp_path):
    names = [f"fine{i}" for i in range(100)]
    write_pickle(tmp_path / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20})
    write_pickle(tmp_path / "train", {"data": cifar_rows(4, 1), "fine_labels": [99, 0, 5, 7], "coarse_labels": [0] * 4})
    write_pickle(tmp_path / "test", {"data": cifar_rows(2, 2), "fine_labels": [1, 2], "coarse_labels": [0] * 2})
    pool = load_dataset("cifar100", root=tmp_path)
    assert pool.labels.tolist() == [99, 0, 5, 7] and pool.class_names[99] == "fine99"


def test_cifar_label_outside_the_class_list(tmp_path):
    write_fake_cifar10(tmp_path, bad_label=10)
    with pytest.raises(ValueError, match="label 10 of image 'cifar10/train/00009' is outside the class list"):
        load_dataset("cifar10", root=tmp_path)


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    assert "cifar-10-python.tar.gz" in str(err.value) and "download=True" in str(err.value)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    write_fake_cifar10(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    write_pickle(tmp_path / "batches.meta", {"label_names": Exploit()})
    with pytest.raises(ValueError, match="not a readable CIFAR python batch"):
        load_dataset("cifar10", root=tmp_path)


# ---------------------------------------------------------------------------------------- ImageFolder


def make_folder(root: Path, layout: dict[str, int]) -> None:
    for cls, n in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 5), (10 * i, 20, 30)).save(root / cls / f"{i}.png")


def test_imagefolder_ids_labels_and_decoding(tmp_path):
    make_folder(tmp_path, {"dog": 2, "cat": 3})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    pool = load_dataset("imagefolder", root=tmp_path)
    assert pool.class_names == ["cat", "dog"]
    assert pool.ids == [f"imagefolder/cat/{i}.png" for i in range(3)] + [f"imagefolder/dog/{i}.png" for i in range(2)]
    assert pool.labels.tolist() == [0, 0, 0, 1, 1] and pool.skipped == []
    image_id, image, label = pool[4]
    assert (image_id, label, image.size, image.getpixel((0, 0))) == ("imagefolder/dog/1.png", 1, (6, 5), (10, 20, 30))


def test_imagefolder_skips_corrupt_and_truncated_files_and_reports_them(tmp_path, caplog):
    make_folder(tmp_path, {"a": 3, "b": 3})
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    with caplog.at_level(logging.WARNING, logger="vecaf.data.sources"):
        pool = load_dataset("imagefolder", root=tmp_path)
    assert len(pool) == 6
    assert sorted(Path(p).name for p, _ in pool.skipped) == ["garbage.jpg", "truncated.png"]
    assert all(reason for _, reason in pool.skipped)
    assert "skipped 2 unreadable image(s) of 8" in caplog.text
    assert [pool[i][1].size for i in range(len(pool))] == [(6, 5)] * 6


def test_imagefolder_strict_mode_fails_on_a_corrupt_file(tmp_path):
    make_folder(tmp_path, {"a": 2})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png.*strict"):
        load_dataset("imagefolder", root=tmp_path, strict=True)


def test_imagefolder_limit_refills_past_skipped_files(tmp_path):
    make_folder(tmp_path, {"a": 4, "b": 4})
    for cls in ("a", "b"):
        (tmp_path / cls / "bad.png").write_bytes(b"junk")
    pool = load_dataset("imagefolder", root=tmp_path, limit=8)
    assert len(pool) == 8 and pool.class_counts().tolist() == [4, 4]
    assert len(pool.skipped) == 2


def test_imagefolder_uses_the_split_subfolder(tmp_path):
    make_folder(tmp_path / "train", {"x": 1, "y": 1})
    make_folder(tmp_path / "val", {"x": 2, "y": 1})
    pool = load_dataset("imagefolder", root=tmp_path, split="val")
    assert pool.split == "val" and len(pool) == 3 and pool.ids[0] == "imagefolder/val/x/0.png"


def test_imagefolder_empty_or_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="empty or has no class subfolders"):
        load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "nope")
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("imagefolder")


def test_imagefolder_where_nothing_decodes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of its 1 image files can be decoded"):
        load_dataset("imagefolder", root=tmp_path)


def test_image_dataset_is_a_torch_dataset_with_index_checks():
    pool = load_dataset("digits", split="test", limit=3)
    assert isinstance(pool, ImageDataset) and isinstance(pool, torch.utils.data.Dataset)
    assert pool[-1][0] == pool.ids[-1]
    with pytest.raises(IndexError):
        pool[3]
    assert pool.caption_class_names() == [pool.class_names[y] for y in pool.labels]
