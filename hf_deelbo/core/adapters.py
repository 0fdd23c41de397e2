"""PEFT adapters (`peft.PeftModel`, e.g. LoRA) as the fine-tuned weights.

With a PeftModel the trainable parameters are the adapter's (LoRA's `lora_A`, `lora_B`) and the
trainable copy of the head that `modules_to_save` makes (`<head>.modules_to_save.<adapter>`); the
base model's weights, and the frozen `original_module` copy of the head, are frozen and outside D.
The adapter weights are the backbone: their prior mean μ is their value when the trainer is built
(LoRA's `lora_B` starts at 0, so the adapted layers start at the pretrained function). The head
keeps N(0, τI).

`peft` is optional: nothing here imports it unless it was already imported (a model cannot be a
PeftModel otherwise).
"""

from __future__ import annotations

import sys

from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a DDP / DataParallel / compiled wrapper) is a `peft.PeftModel`."""
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    from accelerate.utils import extract_model_from_parallel

    return isinstance(extract_model_from_parallel(model), peft.PeftModel)


def peft_base_model(model: nn.Module) -> nn.Module:
    """The model a PeftModel adapts (`get_base_model()`: the transformers or timm classifier, its
    adapted layers and `modules_to_save` wrappers in place); `model` itself if it is no PeftModel."""
    return model.get_base_model() if is_peft_model(model) else model


def peft_module_name(model: nn.Module, name: str) -> str:
    """The name, in the PeftModel `model`, of the module `name` of its base model; for a module that
    `modules_to_save` wraps, the name of its trainable copy (`<name>.modules_to_save.<adapter>`).
    Names already in `model`'s namespace are returned as they are."""
    modules = dict(model.named_modules())
    base = peft_base_model(model)
    prefix = next(n for n, m in model.named_modules() if m is base)  # "base_model.model"
    if not name.startswith(prefix + ".") and f"{prefix}.{name}" in modules:
        name = f"{prefix}.{name}"
    return _trainable_copy(model, name, modules) if name in modules else name


def _trainable_copy(model: nn.Module, name: str, modules: dict) -> str:
    module = modules[name]
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):
        adapter = getattr(model, "active_adapter", None)
        adapter = adapter if isinstance(adapter, str) and adapter in copies else next(iter(copies))
        return f"{name}.modules_to_save.{adapter}"
    return name


def peft_modules_to_save_hint(model: nn.Module, head_modules: list[str]) -> str:
    """The fix for a PeftModel whose head has no trainable parameter (not in `modules_to_save`)."""
    if not is_peft_model(model):
        return ""
    base_names = [n.removeprefix("base_model.model.").split(".modules_to_save.")[0] for n in head_modules]
    return (
        f" With a PeftModel, the new head must be trainable: add it to the adapter's modules_to_save, e.g. "
        f"LoraConfig(..., modules_to_save={base_names})."
    )


def peft_type(model: nn.Module) -> str | None:
    """The active adapter's method (`"lora"`, ...), or None for a model that is no PeftModel."""
    if not is_peft_model(model):
        return None
    config = model.active_peft_config
    value = getattr(config.peft_type, "value", config.peft_type)
    return str(value).lower()


# peft.utils.SAFETENSORS_WEIGHTS_NAME: the file `PeftModel.save_pretrained` (and Trainer's checkpoints) write.
ADAPTER_SAFE_WEIGHTS_NAME = "adapter_model.safetensors"


def restore_adapter_weights(model: nn.Module, weights_file: str) -> None:
    """Copy the adapter weights of `weights_file` (a checkpoint's adapter_model.safetensors) into the
    PeftModel `model`'s active adapter, in place and strictly: every saved tensor must be one of the
    adapter's and every one of the adapter's must be saved, with the same shape.

    Trainer resumes a PeftModel with `PeftModel.load_adapter`, which only warns about adapter tensors
    the checkpoint lacks and resumes with their fresh values. In place because the trainer's μ,
    posterior and optimizer hold the parameter tensors themselves.
    """
    import safetensors.torch
    import torch
    from peft import get_peft_model_state_dict

    saved = safetensors.torch.load_file(weights_file, device="cpu")
    expected = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    mismatched = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{weights_file} does not hold the adapter {model.active_adapter!r} of this model: missing {missing}, "
            f"unexpected {unexpected}, different shapes {mismatched}. Resume with the PEFT configuration that wrote it."
        )
    parameters = {p.data_ptr(): p for p in model.parameters()}
    with torch.no_grad():
        for key, target in expected.items():
            if target.data_ptr() not in parameters:
                raise RuntimeError(f"peft's state dict entry {key} is not a view of a parameter of the model.")
            target.copy_(saved[key])
