"""One table of every trainer's config entry through save → load → equal, for a transformers
model and a raw timm model."""

import pytest
import torch
from conftest import build_model, image_dataset
from transformers import AutoModelForImageClassification

from hf_deelbo.core.trainer import FineTuningTrainer
from hf_deelbo.hub import load_timm_model
from hf_deelbo.registry import registered_methods


def _method_trainers() -> dict[str, type]:
    """Config key -> the package's trainer of that registered method (the one that declares it)."""
    found, pending = {}, list(FineTuningTrainer.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__.startswith("hf_deelbo.") and "method" in vars(cls):
            found[cls.method.key] = cls
    return found


# Every registered method, by registration: a new method is in the table without editing it.
TRAINERS = {
    spec.key: (_method_trainers()[spec.key], _method_trainers()[spec.key].args_class, spec.contract_arguments)
    for spec in registered_methods()
}


def test_the_table_holds_every_registered_method():
    assert set(TRAINERS) == {spec.key for spec in registered_methods()} == set(_method_trainers())
    assert set(TRAINERS) >= {"deelbo", "l2sp", "tpgm", "t1t2"}
    for spec in registered_methods():  # an entry's format version is always part of its schema
        assert (spec.format_version is None) == ("format_version" not in spec.schema), spec.key


@pytest.mark.parametrize("kind", ["vit", "timm"])
@pytest.mark.parametrize("key", list(TRAINERS))
def test_config_entry_survives_save_and_load(key, kind, tmp_path, caplog):
    trainer_class, args_class, extra = TRAINERS[key]
    model, _ = build_model(kind)
    args = args_class(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=0.05,
        optim="sgd",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **extra,
    )
    trainer = trainer_class(
        model=model, args=args, train_dataset=image_dataset(16), eval_dataset=image_dataset(16, seed=1)
    )
    trainer.train()
    trainer.save_model()
    entry = trainer.config_entry()
    assert entry and all(v is not None for v in entry.values()), entry  # learned values exist after training
    typed = trainer.method_config()  # the typed entry: the registered class, the same JSON
    assert type(typed) is trainer_class.method.config_class and typed.to_dict() == entry
    assert trainer_class.method.config_class.from_pretrained(str(tmp_path / "out")) == typed  # the one reader
    if kind == "vit":
        reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out"))
        assert getattr(reloaded.config, key) == entry
    else:
        reloaded = load_timm_model(str(tmp_path / "out"))
        assert getattr(reloaded, f"{key}_config") == entry
    for (name, p), q in zip(model.named_parameters(), reloaded.parameters(), strict=False):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=name)
