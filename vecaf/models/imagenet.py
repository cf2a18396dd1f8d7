"""The 1000 ImageNet-1k class names, in the order of the classifier's outputs.

They come from timm's bundled ImageNet metadata (``timm.data.ImageNetInfo``): each class has a WordNet id
and a description such as "tabby, tabby cat"; the short name is the first synonym ("tabby"). No file is
downloaded.
"""

from __future__ import annotations

from functools import lru_cache

IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def _descriptions() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def imagenet_class_names(*, short: bool = True) -> list[str]:
    """ImageNet-1k class names by classifier index.

    Args:
        short: the first synonym only ("tabby") rather than the full description ("tabby, tabby cat").

    Returns:
        1000 strings; index i names output i of an ImageNet-1k classifier.
    """
    descriptions = _descriptions()
    if not short:
        return list(descriptions)
    return [d.split(",")[0].strip() for d in descriptions]


def imagenet_wnids() -> list[str]:
    """The WordNet ids ("n02123045", ...) of the 1000 classes, by classifier index."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return [info.index_to_label_name(i) for i in range(info.num_classes())]
