"""The paper's central claim at small scale, on real data: pretrained on digits 0–4, fine-tuned on
100 images of 5–9 (D ≈ 4.9M ≫ N = 100)."""

import math

import pytest
import torch

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments, digits


@pytest.mark.slow
def test_deelbo_beats_plain_elbo_which_collapses(tmp_path):
    backbone = digits.pretrained_backbone_path()
    train, test = digits.split(digits.digits_dataset(digits.TARGET_CLASSES), 100, seed=0)
    results = {}
    # As short as the claim allows: DE ELBO reaches 0.95 accuracy (NLL 0.15) in 50 steps, and the
    # plain ELBO has collapsed to NLL ≈ log 5 (accuracy 0.20) by step 30; 100 steps each cost 2.5×.
    for name, kappa, steps in (("deelbo", None, 50), ("elbo", 1.0, 30)):
        model = digits.load_backbone_with_new_head(backbone, 5, seed=0)
        args = DEELBoTrainingArguments(
            output_dir=str(tmp_path / name),
            kappa=kappa,
            max_steps=steps,
            learning_rate=0.03,
            optim="sgd",
            optim_args="momentum=0.9,nesterov=True",
            lr_scheduler_type="cosine",
            per_device_train_batch_size=32,
            logging_steps=10,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            remove_unused_columns=False,
            seed=0,
        )
        trainer = DEELBoTrainer(model=model, args=args, train_dataset=digits.with_pixel_values(train))
        trainer.train()
        output = trainer.predict(digits.with_pixel_values(test))
        metrics = digits.classification_metrics(torch.tensor(output.predictions), torch.tensor(output.label_ids))
        logged = [e for e in trainer.state.log_history if "lambda" in e]
        assert logged and all(math.isfinite(e["lambda"]) and math.isfinite(e["tau"]) for e in logged)
        assert model.deelbo_config["lambda"] > 0 and model.deelbo_config["tau"] > 0
        results[name] = metrics

    # ELBO (κ = 1): the KL of ~4.9M weights overwhelms 100 examples; predictions collapse toward
    # uniform, test NLL near log 5.
    assert results["elbo"]["nll"] > 0.8 * math.log(5)
    assert results["deelbo"]["accuracy"] > 0.85
    assert results["deelbo"]["nll"] < 0.5
    assert results["deelbo"]["accuracy"] > results["elbo"]["accuracy"] + 0.2
