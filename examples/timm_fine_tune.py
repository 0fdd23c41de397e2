"""Fine-tune a raw timm model from the Hub with DE ELBO, and save it in timm's format.

    python examples/timm_fine_tune.py --model timm/resnet18.a1_in1k --train_dir path/to/images \
        --output_dir resnet18-deelbo --max_steps 1000 --learning_rate 0.01

Without --model it uses the embedded backbone pretrained on digits 0-4 (offline), and without
--train_dir the digits 5-9 (scikit-learn's digits):

    python examples/timm_fine_tune.py --output_dir timm-digits-deelbo --max_steps 100

The result loads with `timm.create_model("local-dir:OUTPUT_DIR", pretrained=True)` (or
"hf-hub:..." once pushed), and with transformers' AutoModelForImageClassification.
"""

from dataclasses import dataclass, field

import timm
import torch
from datasets import load_dataset
from transformers import HfArgumentParser

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments, digits


@dataclass
class ExampleArguments:
    model: str | None = field(default=None, metadata={"help": "timm Hub id (e.g. timm/resnet18.a1_in1k)."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder, one sub-folder per class."})
    num_train_examples_kept: int = field(default=100, metadata={"help": "Digits 5-9 examples (default data)."})


def main():
    parser = HfArgumentParser((ExampleArguments, DEELBoTrainingArguments))
    example, args = parser.parse_args_into_dataclasses()
    args.remove_unused_columns = False

    if example.train_dir is None:
        train, test = digits.split(
            digits.digits_dataset(digits.TARGET_CLASSES), example.num_train_examples_kept, args.seed
        )
        train, test, num_classes = digits.with_pixel_values(train), digits.with_pixel_values(test), 5
    else:
        data = load_dataset("imagefolder", data_files={"train": f"{example.train_dir}/**"})["train"]
        num_classes = data.features["label"].num_classes
        test = None
    if example.model is None:
        model = digits.load_backbone_with_new_head(digits.pretrained_backbone_path(), num_classes, seed=args.seed)
    else:
        model = timm.create_model(f"hf-hub:{example.model}", pretrained=True)
        model.reset_classifier(num_classes)  # the new head; DEELBoTrainer finds it with get_classifier()
    if example.train_dir is not None:
        config = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**config, is_training=True)
        train = data.with_transform(
            lambda b: {"pixel_values": [transform(i.convert("RGB")) for i in b["image"]], "labels": b["label"]}
        )

    trainer = DEELBoTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    trainer.save_model()  # timm's format: model.safetensors + config.json with `deelbo`
    if test is not None:
        output = trainer.predict(test)
        accuracy = (torch.tensor(output.predictions).argmax(-1) == torch.tensor(output.label_ids)).float().mean()
        print(f"test accuracy {accuracy:.4f}")
    print("learned:", model.deelbo_config)


if __name__ == "__main__":
    main()
