"""An offline transfer task on real data that ships with scikit-learn: handwritten digits.

A small backbone is pretrained on digits 0–4 and fine-tuned on a few images of digits 5–9, the
situation DE ELBO is made for (D ≫ N). The images (1797 real 8×8 scans) travel as a
`datasets.Dataset` with an `Image` feature, like any Hub image dataset, and are turned into
`pixel_values` by `with_transform`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image

from ..core.modeling import classifier_logits
from ..evaluation.metrics import classification_metrics  # noqa: F401 - the task's metrics, as `digits.classification_metrics`

IMAGE_SIZE = 32
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def digits_dataset(classes: tuple[int, ...]) -> Dataset:
    """The scikit-learn digits of `classes` as a Dataset with columns `image` (PIL) and `label`
    (0..len(classes)-1, named after the digit)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images = (digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    labels = [classes.index(int(t)) for t in digits.target[keep]]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(c) for c in classes])})
    return Dataset.from_dict({"image": list(images), "label": labels}, features=features)


def split(dataset: Dataset, num_train: int | None, seed: int, test_fraction: float = 0.3) -> tuple[Dataset, Dataset]:
    """Stratified train/test split; the train part is cut to `num_train` examples (stratified)."""
    parts = dataset.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")
    train, test = parts["train"], parts["test"]
    if num_train is not None and num_train < len(train):
        train = train.train_test_split(train_size=num_train, seed=seed, stratify_by_column="label")["train"]
    return train, test


def to_pixel_values(batch: dict) -> dict:
    """`with_transform` function: PIL 8×8 grayscale → normalised 3×32×32 float tensors."""
    arrays = np.stack([np.asarray(img.convert("L"), dtype=np.float32) / 255.0 for img in batch["image"]])
    x = torch.from_numpy(arrays)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return {"pixel_values": x, "labels": torch.as_tensor(batch["label"])}


def with_pixel_values(dataset: Dataset) -> Dataset:
    return dataset.with_transform(to_pixel_values)


def tiny_timm_backbone(num_classes: int, seed: int = 0, architecture: str = "resnet10t"):
    """A randomly initialised timm model sized for 32×32 digits, its `pretrained_cfg` describing
    the digits' preprocessing (`digits_pretrained_cfg`)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    model.pretrained_cfg = digits_pretrained_cfg(model)
    return model


def digits_pretrained_cfg(model) -> dict:
    """timm's `pretrained_cfg` for a model fed by `to_pixel_values`: 3×32×32 inputs, mean = std =
    0.5, bilinear resizing, no crop, `num_classes` of the current head. timm's defaults for the
    architecture describe ImageNet weights (`resnet10t`: tag `c3_in1k`, 176×176, ImageNet mean and
    std, a download URL); none of that is true of these weights, so it is left out."""
    from ..hub.timm import PRETRAINED_SOURCE_KEYS

    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in PRETRAINED_SOURCE_KEYS}
    for key in ("test_input_size", "test_crop_pct", "min_input_size", "label_names", "label_descriptions"):
        cfg.pop(key, None)
    cfg.update(
        input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        pool_size=None,
        num_classes=model.num_classes,
    )
    return cfg


def pretrain(
    model: torch.nn.Module,
    dataset: Dataset,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int | None = 0,
):
    """Plain supervised pretraining with Adam (the "upstream" model of the transfer task).

    `dataset`: digits images (turned into `pixel_values` by `to_pixel_values`), or a dataset that
    already has a `pixel_values` column. `seed` seeds torch's RNG (the batch order) first; with
    None, the RNG is used as it is."""
    if seed is not None:
        torch.manual_seed(seed)
    data = dataset if "pixel_values" in (dataset.column_names or []) else with_pixel_values(dataset)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = F.cross_entropy(classifier_logits(model, batch), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def default_cache_dir() -> str:
    """Where the pretrained digits backbone is kept: `$HF_DEELBO_CACHE`, else `hf_deelbo` in
    huggingface_hub's cache home (`$HF_HOME`, default `~/.cache/huggingface`)."""
    import os

    from huggingface_hub import constants

    return os.environ.get("HF_DEELBO_CACHE") or os.path.join(constants.HF_HOME, "hf_deelbo")


def pretrained_backbone_path(
    architecture: str = "resnet10t", cache_dir: str | None = None, epochs: int = 3, seed: int = 0
) -> str:
    """A timm model pretrained on digits 0–4, saved in timm's Hub format (config.json +
    model.safetensors) and built once: later calls return the cached directory (processes that
    ask at the same time wait for the one that builds it). Load it with
    `timm.create_model(f"local-dir:{path}", pretrained=True)`, the same code path as a Hub id."""
    import os

    from huggingface_hub.utils import WeakFileLock

    path = os.path.join(cache_dir or default_cache_dir(), f"digits0-4-{architecture}-e{epochs}-s{seed}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with WeakFileLock(f"{path}.lock"):
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            _build_backbone(path, architecture, epochs, seed)
    return path


def _build_backbone(path: str, architecture: str, epochs: int, seed: int) -> None:
    import os
    import shutil

    from timm.models._hub import save_for_hf

    source_train, _ = split(digits_dataset(SOURCE_CLASSES), None, seed)
    model = pretrain(
        tiny_timm_backbone(len(SOURCE_CLASSES), seed, architecture), source_train, epochs=epochs, seed=seed
    )
    # Written to a temporary directory and renamed, so a crash never leaves a half-written cache.
    tmp = f"{path}.tmp{os.getpid()}"
    save_for_hf(model, tmp, safe_serialization=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def load_backbone_with_new_head(path: str, num_classes: int, seed: int = 0):
    """The pretrained backbone with a freshly initialised head for `num_classes` new labels."""
    import timm

    model = timm.create_model(f"local-dir:{path}", pretrained=True)
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    model.pretrained_cfg = digits_pretrained_cfg(model)  # also for backbones cached before it was set
    return model
