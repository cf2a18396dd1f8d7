"""The model zoo: pretrained vision model (PVM), text encoder and captioner, all loadable offline.

    from vecaf.models import load_pvm, embed, load_text_encoder, load_captioner
    pvm = load_pvm()                                   # EfficientNet-Lite0, embedded ImageNet weights
    e = embed(pvm, dataset)                            # (N, 1280) pre-logits embeddings e_i
    captions = load_captioner(pvm=pvm).caption(images, class_names)
    t = load_text_encoder().encode(captions)           # (N, 384) unit-norm text embeddings t_i

Defaults need no network (``HF_HUB_OFFLINE=1`` works); any other model is named by the user: a timm
architecture with a checkpoint, ``hf:<folder or hub id>``, ``open_clip:<model>/<weights>``. Hub downloads
happen only with ``allow_hub=True``. Inference is batched, under ``torch.inference_mode``, on CUDA when
present, deterministic.
"""

from vecaf.models.captioner import (
    DEFAULT_CAPTIONER,
    PAPER_PROMPT,
    Captioner,
    CocaCaptioner,
    ImageNetLabelCaptioner,
    TransformersCaptioner,
    ensure_keyword,
    list_captioners,
    load_captioner,
)
from vecaf.models.imagenet import imagenet_class_names
from vecaf.models.pvm import (
    DEFAULT_PVM,
    PVM,
    PVMTransform,
    embed,
    list_pvms,
    load_pvm,
    map_state_dict,
    read_state_dict,
)
from vecaf.models.text import (
    DEFAULT_TEXT_ENCODER,
    OpenClipTextEncoder,
    TextEncoder,
    TransformersTextEncoder,
    list_text_encoders,
    load_text_encoder,
    mean_pool,
)

__all__ = [
    "DEFAULT_CAPTIONER",
    "DEFAULT_PVM",
    "DEFAULT_TEXT_ENCODER",
    "PAPER_PROMPT",
    "PVM",
    "Captioner",
    "CocaCaptioner",
    "ImageNetLabelCaptioner",
    "OpenClipTextEncoder",
    "PVMTransform",
    "TextEncoder",
    "TransformersCaptioner",
    "TransformersTextEncoder",
    "embed",
    "ensure_keyword",
    "imagenet_class_names",
    "list_captioners",
    "list_pvms",
    "list_text_encoders",
    "load_captioner",
    "load_pvm",
    "load_text_encoder",
    "map_state_dict",
    "mean_pool",
    "read_state_dict",
]
