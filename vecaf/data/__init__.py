"""Image pools for the pipeline: a dataset type yielding (image_id, image, label) and its sources.

    from vecaf.data import load_dataset, TransformedDataset
    pool = load_dataset("fashion-mnist", split="train", limit=2000)   # seeded stratified subset
    inputs = TransformedDataset(pool, pvm.transform())                 # (image_id, tensor, label)

Sources (:func:`list_datasets`): Fashion-MNIST (Debian ``dataset-fashion-mnist`` or torchvision's download),
scikit-learn digits, CIFAR-10/100 python batches, an ImageFolder directory. See ``vecaf.data.sources``.
"""

from vecaf.data.dataset import (
    ArrayImageDataset,
    FileImageDataset,
    ImageDataset,
    TransformedDataset,
    stratified_order,
    subset_indices,
)
from vecaf.data.sources import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    list_datasets,
    load_dataset,
    read_idx,
)

__all__ = [
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "FileImageDataset",
    "ImageDataset",
    "TransformedDataset",
    "list_datasets",
    "load_dataset",
    "read_idx",
    "stratified_order",
    "subset_indices",
]
