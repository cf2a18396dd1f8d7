"""Typed parameters of the pipeline's flows (pydantic models, so the Prefect UI shows a validated form).

Each flow takes some of these models as its parameters; ``vecaf-pipeline`` takes them all:

- :class:`DataParams`: the image pool and the held-out split (dataset, sizes, PVM input size, shards);
  :class:`HeldOutParams`, its part that promotion uses (the ``promote`` flow's form shows only that).
- :class:`ModelParams`: the PVM, the captioner, the text encoder (Sec. 3.2) and the inference batch.
- :class:`ObjectiveParams`: the loss L_i that training minimises and selection weighs (Eq. 3, Eq. 7):
  cross-entropy, one-vs-all for a target class (Table 3), or class-weighted cross-entropy.
- :class:`TrainingParams`: the loops of active finetuning (Sec. 3.1, Appendix C): method, ratio K/N per
  loop, loops L, batch budget B, CEA (Eq. 8-10).
- :class:`RegistryParams`: where the run is tracked and the model registered, and the promotion margin;
  :class:`PromotionParams`, its part that promotion uses.

Every bound is a JSON-schema constraint (``gt``/``le``/``Literal``) where it can be, so the Prefect server
rejects an out-of-range value when a run is created from a deployment; the rest (``batch_budget >= loops``,
a one-vs-all objective without its class, fresh samples that would not fit the pool) is checked by model
validators. The flows a user starts from the UI (``vecaf-pipeline``, ``promote``) validate their parameters
themselves with :func:`checked`, first thing, so a run whose parameters do not fit fails with one line
naming the field and the rule as its state message. Nothing is imported from the model zoo unless a
non-default model name has to be checked.

:func:`form_schema` makes a deployment's parameter schema what the Prefect UI's form needs: every field
with a default marked required (the form then shows no "(Optional)"; the deployment's own parameters give
the values), bounds, examples and the default written into each description (the form shows descriptions,
not bounds), ``<placeholders>`` escaped (descriptions are rendered as markdown), unknown keys refused.
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder")
METHODS = ("vecaf", "activeft", "coreset", "topk_loss", "entropy", "margin", "random", "full")
"""Selection methods of ``vecaf.list_methods()``, plus "full" (full-data finetuning, no selection)."""
OBJECTIVES = ("ce", "one-vs-all", "class-weighted")

DatasetName = Literal["fashion-mnist", "digits", "cifar10", "cifar100", "imagefolder"]
MethodName = Literal["vecaf", "activeft", "coreset", "topk_loss", "entropy", "margin", "random", "full"]
ObjectiveName = Literal["ce", "one-vs-all", "class-weighted"]

MAX_PROMPT_LENGTH = 300
"""Longest OOD caption suffix (Sec. 3.3): a sentence, not a document; it is stored with every caption."""
MAX_NAME_LENGTH = 200
"""Longest model name, split name or experiment name."""
MAX_PATH_LENGTH = 4096
"""Longest file or folder path (Linux PATH_MAX)."""
MAX_FREE_STRING_LENGTH = 1000
"""Longest value of a top-level string parameter of a deployment that does not set its own bound."""

OodPrompt = Annotated[
    str | None,
    Field(
        max_length=MAX_PROMPT_LENGTH,
        title="OOD caption prompt",
        examples=["a photo of clothing"],
        description="Caption suffix steering selection (Sec. 3.3).",
    ),
]
"""Type of a flow's ``ood_prompt`` parameter: the bound reaches the deployment's schema, so the server refuses
a longer prompt before a run exists."""

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
"""Devices a flow accepts: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:<index>'."""

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-:/@+]+$")
_REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeldOutParams(_Params):
    """The labeled image pool and its held-out split: what promotion evaluates on (and checks disjoint)."""

    dataset: DatasetName = Field(
        "fashion-mnist",
        title="Dataset",
        examples=["fashion-mnist", "digits"],
        description="Image pool (vecaf.data.list_datasets()).",
    )
    root: str | None = Field(
        None,
        max_length=MAX_PATH_LENGTH,
        title="Data folder",
        description="Data folder (ImageFolder root, CIFAR batches, Fashion-MNIST idx files); None: the default."
    )
    train_split: str = Field(
        "train", min_length=1, max_length=MAX_NAME_LENGTH, title="Pool split", description="Split that forms the pool."
    )
    test_split: str = Field(
        "test",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        title="Held-out split",
        description="Held-out split (evaluation and promotion)."
    )
    pool_size: int | None = Field(
        4000,
        ge=10,
        le=10_000_000,
        title="Pool size (images)",
        examples=[3000],
        description="Images of the pool (seeded stratified subset); None: all."
    )
    test_size: int | None = Field(
        1000,
        ge=10,
        le=10_000_000,
        title="Held-out size (images)",
        examples=[1000],
        description="Images of the held-out split (stratified subset); None: all."
    )
    subset_seed: int = Field(0, ge=0, title="Subset seed", description="Seed of the stratified subsets.")
    holdout_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        title="Held-out fraction (ImageFolder)",
        description="ImageFolder without train/test folders: share of the images carved out as the held-out split "
        "(by content hash, so pool and held-out never share an image).",
    )
    allow_overlap: bool = Field(
        False,
        title="Allow pool/held-out overlap",
        description="Accept a held-out split that shares images (same content hash) with the pool; off: refused, "
        "because accuracies and promotion would be measured on training images.",
    )

    @model_validator(mode="after")
    def _imagefolder_needs_root(self) -> DataParams:
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("dataset 'imagefolder' needs root=<folder of class sub-folders>")
        if self.train_split == self.test_split and not self.allow_overlap:
            raise ValueError(
                f"train_split and test_split are both {self.train_split!r}: the held-out split would be the pool; "
                "name two splits, or set allow_overlap=true to evaluate on training images knowingly"
            )
        return self


class DataParams(HeldOutParams):
    """The labeled image pool, its held-out split, the PVM input size and the shards of the feature steps."""

    image_size: int | None = Field(
        64,
        ge=16,
        le=1024,
        title="Input size (pixels)",
        examples=[64],
        description="PVM input side S in pixels; None: the PVM's own (224 for EfficientNet-Lite0)."
    )
    shard_size: int = Field(
        1000,
        ge=16,
        le=1_000_000,
        title="Shard size (images per task)",
        description="Images per captioning/embedding task.",
    )

    def held_out(self) -> HeldOutParams:
        """The part promotion uses (what the ``promote`` flow takes)."""
        return HeldOutParams(**self.model_dump(include=set(HeldOutParams.model_fields)))


class ModelParams(_Params):
    """The pretrained models (Sec. 3.2): PVM, captioner, text encoder."""

    pvm: str = Field(
        "efficientnet_lite0",
        max_length=MAX_NAME_LENGTH,
        title="Pretrained vision model (PVM)", description="PVM: 'efficientnet_lite0' or a timm architecture.",
    )
    pvm_checkpoint: str | None = Field(
        None,
        max_length=MAX_PATH_LENGTH,
        title="PVM checkpoint file",
        description="A local state_dict file loaded into the PVM instead of its default weights.",
    )
    captioner: str = Field(
        "imagenet-labels",
        max_length=MAX_PATH_LENGTH,
        title="Captioner",
        description="'imagenet-labels', an alias (blip-base, coca...), 'hf:<folder>' or 'open_clip:<spec>'.",
    )
    text_encoder: str = Field(
        "all-MiniLM-L6-v2",
        max_length=MAX_PATH_LENGTH,
        title="Text encoder",
        description="'all-MiniLM-L6-v2', an alias (clip, bert-large...), 'hf:<folder>' or 'open_clip:<spec>'.",
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=4096,
        title="Inference batch size",
        description="Images or captions per inference batch.",
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        title="Device",
        examples=["auto", "cpu", "cuda:0"],
        description="'auto' picks CUDA when present.",
    )

    @field_validator("pvm", "captioner", "text_encoder")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _MODEL_NAME.fullmatch(value):
            raise ValueError(f"model name {value!r} must be non-empty, without spaces")
        return value

    @field_validator("captioner")
    @classmethod
    def _known_captioner(cls, value: str) -> str:
        if value == "imagenet-labels" or value.startswith(("hf:", "open_clip:")):
            return value
        from vecaf.models import list_captioners

        known = [n for n in list_captioners() if "<" not in n]
        if value not in known:
            raise ValueError(f"unknown captioner {value!r}; known: {', '.join(known)}, hf:<folder>, open_clip:<spec>")
        return value

    @field_validator("text_encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if value == "all-MiniLM-L6-v2" or value.startswith(("hf:", "open_clip:")):
            return value
        from vecaf.models import list_text_encoders
        from vecaf.models.text import _MINILM_ALIASES

        known = sorted({n for n in list_text_encoders() if "<" not in n} | set(_MINILM_ALIASES))
        if value not in known:
            raise ValueError(
                f"unknown text encoder {value!r}; known: {', '.join(known)}, hf:<folder>, open_clip:<spec>"
            )
        return value


class ObjectiveParams(_Params):
    """The per-sample loss L_i (Eq. 3) that training minimises and ODS weighs (Eq. 7)."""

    kind: ObjectiveName = Field(
        "ce",
        title="Objective",
        description="'ce', 'one-vs-all' (Table 3) or 'class-weighted'.",
    )
    target_class: int | None = Field(
        None,
        ge=0,
        title="Target class (one-vs-all)",
        examples=[0],
        description="Class index of the one-vs-all objective.",
    )
    class_weights: list[float] | None = Field(
        None,
        min_length=2,
        max_length=100_000,
        title="Class weights", description="One positive weight per class (class-weighted cross-entropy).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveParams:
        if self.kind == "one-vs-all" and self.target_class is None:
            raise ValueError("objective 'one-vs-all' needs target_class")
        if self.kind != "one-vs-all" and self.target_class is not None:
            raise ValueError(f"target_class is only used by the 'one-vs-all' objective, not {self.kind!r}")
        if self.kind == "class-weighted":
            if self.class_weights is None:
                raise ValueError("objective 'class-weighted' needs class_weights (one per class)")
            if any(not (w > 0 and w < float("inf")) for w in self.class_weights):
                raise ValueError(f"class_weights must be finite and positive, got {self.class_weights}")
        elif self.class_weights is not None:
            raise ValueError(f"class_weights are only used by the 'class-weighted' objective, not {self.kind!r}")
        return self


class TrainingParams(_Params):
    """The loops of active finetuning (Sec. 3.1, Appendix C) and CEA (Eq. 8-10)."""

    mode: Literal["head", "full"] = Field(
        "head",
        title="Training mode",
        description="'head': frozen PVM, train the head; 'full': the whole network trains."
    )
    method: MethodName = Field(
        "vecaf",
        title="Selection method",
        description="Selection method, or 'full' for full-data finetuning.",
    )
    ratio: float = Field(
        0.01,
        gt=0.0,
        le=0.5,
        title="Selected share per loop (K/N)",
        examples=[0.01],
        description="K/N, the share of the pool selected per loop.",
    )
    loops: int = Field(3, ge=1, le=100, title="Loops (L)", examples=[3], description="L, selection + training loops.")
    batch_budget: int = Field(
        300,
        ge=1,
        le=1_000_000,
        title="Training batch budget (B)",
        examples=[300],
        description="B, training batches over all loops (B/L per loop).",
    )
    batch_size: int = Field(32, ge=1, le=4096, title="Training batch size", description="Training batch size.")
    lr: float = Field(
        5e-4,
        gt=0.0,
        le=10.0,
        title="Learning rate",
        examples=[0.0005, 0.05],
        description="Initial SGD learning rate (cosine decay over B).",
    )
    cea: bool = Field(
        True,
        title="Caption embedding augmentation (CEA)",
        description="Cross-attentive embedding augmentation from the captions (Eq. 8-10).",
    )
    eta: float = Field(1.0, ge=0.0, le=10.0, title="CEA step size (eta)", description="CEA step size eta (Eq. 9).")
    lam_bw: float = Field(
        0.998,
        ge=0.0,
        le=1.0,
        title="CEA balance (lam_bw)",
        description="CEA balance lam_bw (Eq. 10); 1 disables CEA.",
    )
    exclude_previous: bool = Field(
        True,
        title="Exclude earlier picks",
        description="Never re-select a sample picked in an earlier loop.",
    )
    cumulative: bool = Field(
        True,
        title="Train on all picks so far",
        description="Train each loop on all picks so far (growing labelled set; measured: accuracy rises loop to "
        "loop); off: the loop's picks only (the paper's per-loop protocol).",
    )
    loss_power: float = Field(
        0.5,
        gt=0.0,
        le=10.0,
        title="Loss power",
        description="VeCAF: selection weights p ~ L^loss_power (1 = Eq. 3 as written)."
    )
    selection_loss: Literal["expected", "observed"] = Field(
        "expected",
        title="Selection loss",
        description="VeCAF: weigh the selection by the expected loss under the model's own prediction "
        "(measured better) or by the observed loss at the label (Eq. 3 as written).",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        title="Evaluate every n batches",
        description="Evaluate every n batches (default B // 10).",
    )
    seed: int = Field(0, ge=0, title="Seed", description="Seed of the head, the selection and the batch order.")
    init: Literal["champion", "base"] = Field(
        "champion",
        title="Start from",
        description="Start from the registered champion when its classes and architecture match (loop 1's "
        "losses come from it), else from the base PVM; 'base': always the base PVM.",
    )

    @model_validator(mode="after")
    def _budget_covers_loops(self) -> TrainingParams:
        if self.batch_budget < self.loops:
            raise ValueError(
                f"batch_budget ({self.batch_budget}) must be at least loops ({self.loops}): every loop trains a batch"
            )
        return self


class PromotionParams(_Params):
    """The registered model whose challenger is compared with its champion, and the margin it must win by."""

    model_name: str = Field(
        "vecaf-classifier",
        title="Registered model name",
        examples=["vecaf-classifier", "vecaf-sandbox"],
        description="Registered model name in the MLflow registry.",
    )
    promotion_margin: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="Promotion margin (top-1)",
        examples=[0.0, 0.01],
        description="The challenger becomes champion only if its held-out top-1 beats the champion's by more.",
    )

    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, value: str) -> str:
        if not _REGISTRY_NAME.fullmatch(value):
            raise ValueError(
                f"model_name {value!r} must start with a letter or digit and hold only letters, digits, '_', '-', '.'"
            )
        return value


class RegistryParams(PromotionParams):
    """Tracking, registration and promotion."""

    experiment: str = Field(
        "vecaf",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        title="MLflow experiment",
        examples=["vecaf"],
        description="MLflow experiment.",
    )
    promote: bool = Field(
        True,
        title="Promote after finetuning",
        description="Run the promotion flow after finetuning (vecaf-pipeline).",
    )

    def promotion(self) -> PromotionParams:
        """The part promotion uses (what the ``promote`` flow takes)."""
        return PromotionParams(**self.model_dump(include=set(PromotionParams.model_fields)))


class PipelineParams(_Params):
    """All parameters of ``vecaf-pipeline`` in one object (what ``vecaf run`` and the demo build)."""

    data: DataParams = DataParams()
    models: ModelParams = ModelParams()
    ood_prompt: OodPrompt = None
    objective: ObjectiveParams = ObjectiveParams()
    training: TrainingParams = TrainingParams()
    registry: RegistryParams = RegistryParams()

    @field_validator("ood_prompt")
    @classmethod
    def _strip_prompt(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        return value or None

    @model_validator(mode="after")
    def _fits_pool(self) -> PipelineParams:
        check_training_fits(self.data, self.training, self.objective)
        return self

    def flow_parameters(self) -> dict[str, Any]:
        """The parameters of the ``vecaf-pipeline`` flow (JSON-ready), as a deployment or a run takes them."""
        return self.model_dump(mode="json")


def check_training_fits(data: DataParams, training: TrainingParams, objective: ObjectiveParams) -> None:
    """Cross-checks between the pool size and the loops: every loop must pick at least one fresh sample.

    With N the pool size (when known), K = round(ratio * N) >= 1 and, with ``exclude_previous``,
    K * L <= N; a one-vs-all target class or class weights must fit the dataset's class count (checked
    later, when the dataset is loaded, for datasets whose class count is not fixed).

    Raises:
        ValueError: naming the parameters that do not fit.
    """
    n = data.pool_size
    if n is not None and training.method != "full":
        k = max(1, round(training.ratio * n))
        if training.exclude_previous and k * training.loops > n:
            raise ValueError(
                f"{training.loops} loops of K={k} fresh samples (ratio {training.ratio} of pool_size {n}) need "
                f"{k * training.loops} images; lower ratio or loops, or set exclude_previous=false"
            )
    classes = {"fashion-mnist": 10, "digits": 10, "cifar10": 10, "cifar100": 100}.get(data.dataset)
    if classes is not None:
        check_objective_classes(objective, classes)


def check_objective_classes(objective: ObjectiveParams, num_classes: int) -> None:
    """The target class lies in 0..C-1 and there is one class weight per class.

    Raises:
        ValueError: naming the mismatch.
    """
    if objective.target_class is not None and objective.target_class >= num_classes:
        raise ValueError(f"target_class {objective.target_class} is outside 0..{num_classes - 1}")
    if objective.class_weights is not None and len(objective.class_weights) != num_classes:
        raise ValueError(
            f"class_weights has {len(objective.class_weights)} entries, the dataset has {num_classes} classes"
        )


class ParameterError(ValueError):
    """Flow parameters that do not fit; the message is one line naming each field and what is wrong."""


M = TypeVar("M", bound=BaseModel)


def checked(model: type[M], value: Any) -> M:
    """``value`` (a model instance, or the JSON a deployment run got) validated as ``model``.

    Raises:
        ParameterError: one line, ``invalid parameters: <field>: <reason>; ...`` (cross-field rules included).
    """
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ParameterError(f"invalid parameters: {one_line_errors(exc)}") from None


def one_line_errors(exc: ValidationError) -> str:
    """A pydantic ``ValidationError`` as ``loc: message; loc: message`` on one line (a rule between groups
    has no ``loc``: its message alone)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        message = " ".join(str(err.get("msg", "")).split()).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


def closed_parameter_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A flow's parameter schema that refuses unknown top-level parameters and unbounded strings.

    Prefect builds a deployment's schema from the flow's signature without ``additionalProperties``, so
    its server accepts a run with an unknown top-level parameter (the run then dies in the worker with
    only "Process exited with status code: 1"). The parameter models are ``extra="forbid"`` already;
    this closes the top level too, and gives every top-level string that has no ``maxLength`` the bound
    ``MAX_FREE_STRING_LENGTH``.

    Args:
        schema: the deployment's ``parameter_openapi_schema`` (not modified).

    Returns:
        A copy with ``additionalProperties: false`` and the string bounds.
    """
    closed = copy.deepcopy(schema)
    closed["additionalProperties"] = False
    for prop in closed.get("properties", {}).values():
        variants = prop.get("anyOf", [prop])
        for variant in variants:
            if variant.get("type") == "string" and "maxLength" not in variant and "enum" not in variant:
                variant["maxLength"] = MAX_FREE_STRING_LENGTH
    return closed


FORM_TITLES = {
    "DataParams": "Data", "HeldOutParams": "Held-out data", "ModelParams": "Models", "ObjectiveParams": "Objective",
    "TrainingParams": "Training", "RegistryParams": "Tracking and registry", "PromotionParams": "Registered model",
    "ood_prompt": "OOD caption prompt", "device": "Device", "rollback": "Roll back to the previous champion",
    "to_version": "Move champion to version", "text": "Embed captions", "kind": "Shard kind", "split": "Split",
    "start": "First index", "stop": "Index after the last",
}  # fmt: skip
"""Titles of the flows' top-level parameters in the UI form, by model (for a parameter group) or by name
(Prefect titles them with the bare parameter name)."""


def form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A deployment's parameter schema as the Prefect UI's form should show it (see the module docstring).

    On top of :func:`closed_parameter_schema`: in the top level and in every model, each property whose
    default is not null is listed in ``required``; each scalar property's description gains its range,
    examples and default (:func:`form_description`); top-level properties get the titles of
    :data:`FORM_TITLES`. Required fields need their values in every run, which a deployment's parameters
    (``flows.deploy`` registers the flow's defaults) and the form give; a run that names a group must name
    its fields, else the server refuses it with the missing field's name.

    Args:
        schema: the deployment's ``parameter_openapi_schema`` (not modified).
    """
    out = closed_parameter_schema(schema)
    for name, prop in out.get("properties", {}).items():
        key = prop["$ref"].rsplit("/", 1)[-1] if "$ref" in prop else name
        prop["title"] = FORM_TITLES.get(key, name.replace("_", " ").capitalize())
    for obj in [out, *out.get("definitions", {}).values()]:
        props = obj.get("properties", {})
        obj["required"] = [name for name, prop in props.items() if prop.get("default") is not None]
        for prop in props.values():
            if "$ref" not in prop:
                prop["description"] = form_description(prop)
    return out


def form_description(prop: dict[str, Any]) -> str:
    """A property's description with ``<``/``>`` escaped for markdown, then ``Range: ...``, ``Examples: ...``
    (those other than the default) and ``Default: ...`` sentences taken from its schema."""
    text = (prop.get("description") or "").replace("<", "&lt;").replace(">", "&gt;").strip()
    variants = [prop, *prop.get("anyOf", [])]
    low = next(((v[k], "<" if k == "exclusiveMinimum" else "≤") for v in variants
                for k in ("minimum", "exclusiveMinimum") if k in v), None)  # fmt: skip
    high = next(((v[k], "<" if k == "exclusiveMaximum" else "≤") for v in variants
                 for k in ("maximum", "exclusiveMaximum") if k in v), None)  # fmt: skip
    parts = [text] if text else []
    if low and high:
        parts.append(f"Range: {_shown(low[0])} {low[1]} x {high[1]} {_shown(high[0])}.")
    elif low:
        parts.append(f"Range: x {'>' if low[1] == '<' else '≥'} {_shown(low[0])}.")
    elif high:
        parts.append(f"Range: x {high[1]} {_shown(high[0])}.")
    default = prop.get("default")
    examples = [e for e in prop.get("examples", []) if e != default]
    if examples:
        parts.append(f"Example{'s' if len(examples) > 1 else ''}: {', '.join(_shown(e) for e in examples)}.")
    if default is not None and not isinstance(default, (dict, list)):
        parts.append(f"Default: {_shown(default)}.")
    return " ".join(parts)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def close_deployment_parameters(deployment_id: Any) -> dict[str, Any]:
    """Store :func:`form_schema` as the deployment's schema (the current Prefect API).

    With ``enforce_parameter_schema`` the server then refuses, before a flow run exists, a run whose
    parameters hold an unknown top-level key, an oversized string, an out-of-range value or miss a field.

    Returns:
        The schema stored.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        closed = form_schema(deployment.parameter_openapi_schema or {"type": "object", "properties": {}})
        client.update_deployment(deployment_id, DeploymentUpdate(parameter_openapi_schema=closed))
    return closed
