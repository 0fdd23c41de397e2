"""Which trainable parameters are the pretrained backbone and which are the new head.

The backbone gets the prior N(μ, λI) centred on its pretrained weights μ; the head, freshly
initialised for the user's labels, gets N(0, τI). Frozen parameters belong to neither group and
are not counted in D. Buffers (BatchNorm running statistics) are never parameters of q.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import is_peft_model, peft_base_model, peft_module_name, peft_modules_to_save_hint

# Top-level module names that hold the classification head in transformers' classifiers:
# ViT, DeiT, BEiT, Swin, ConvNeXt and BERT use `classifier` (ResNet's is `classifier.1` inside
# a Sequential), DeiT's distilled variant has two heads, sequence classifiers of decoder models
# use `score`.
HF_HEAD_MODULE_NAMES = ("classifier", "score", "cls_classifier", "distillation_classifier")


@dataclass
class ParameterGroups:
    """Names of the trainable parameters in each group, in `model.named_parameters()` order."""

    backbone: list[str]
    head: list[str]
    head_modules: list[str]


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def detect_head_modules(model: nn.Module) -> list[str]:
    """Names of the modules holding the new classification head.

    - raw timm models: `model.get_classifier()`;
    - `TimmWrapperForImageClassification`: the wrapped timm model's `get_classifier()`;
    - other transformers models: top-level children named in `HF_HEAD_MODULE_NAMES`;
    - `peft.PeftModel`: the head of its base model, as the trainable copy `modules_to_save` made
      of it (`base_model.model.classifier.modules_to_save.default`), if it made one.
    """
    if is_peft_model(model):
        return [peft_module_name(model, name) for name in detect_head_modules(peft_base_model(model))]
    timm_model = model if hasattr(model, "get_classifier") else getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        name = _module_name(model, timm_model.get_classifier())
        return [name] if name else []
    return [name for name, child in model.named_children() if name in HF_HEAD_MODULE_NAMES]


def _matches(parameter_name: str, prefixes: list[str]) -> bool:
    return any(parameter_name == p or parameter_name.startswith(p + ".") for p in prefixes)


def split_parameters(model: nn.Module, head_modules: list[str] | None = None) -> ParameterGroups:
    """Split the trainable parameters of `model` into backbone and head.

    Args:
        model: the model to fine-tune.
        head_modules: module-name prefixes of the head (e.g. `["classifier"]`, `["head.fc"]`);
            `None` detects them with `detect_head_modules`. For a `peft.PeftModel`, names of its
            base model's modules are accepted too (`["classifier"]`: the `modules_to_save` copy).

    Raises:
        ValueError: when the head matches no trainable parameter or every trainable parameter.
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters (every parameter has requires_grad=False).")
    top_level = sorted({name.split(".")[0] for name in trainable})
    if head_modules is None:
        head_modules = detect_head_modules(model)
        if not head_modules:
            raise ValueError(
                f"Could not detect the classification head of {type(model).__name__}. Pass "
                f"head_modules=[...] with the module names of the new head; the model's top-level "
                f"modules with trainable parameters are {top_level}."
            )
        source = "detected"
    else:
        source = "given"
        if is_peft_model(model):
            head_modules = [peft_module_name(model, name) for name in head_modules]
    head = [name for name in trainable if _matches(name, head_modules)]
    backbone = [name for name in trainable if not _matches(name, head_modules)]
    if not head:
        raise ValueError(
            f"head_modules={head_modules} ({source}) matches no trainable parameter of "
            f"{type(model).__name__}. Use module-name prefixes from the model, e.g. one of {top_level}."
            + peft_modules_to_save_hint(model, head_modules)
        )
    if not backbone:
        raise ValueError(
            f"head_modules={head_modules} ({source}) matches every trainable parameter of "
            f"{type(model).__name__}, leaving no backbone to regularize toward its pretrained weights. "
            f"Name only the new classification head."
        )
    return ParameterGroups(backbone=backbone, head=head, head_modules=list(head_modules))
