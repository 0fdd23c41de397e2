"""Fine-tune a Hub image classifier with DE ELBO: the learned L2-SP strengths replace a grid search.

The flags follow transformers' examples/pytorch/image-classification/run_image_classification.py.

    python examples/run_image_classification.py \
        --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name beans --label_column_name labels --ignore_mismatched_sizes true \
        --output_dir vit-beans-deelbo --remove_unused_columns false \
        --learning_rate 0.01 --optim sgd --optim_args "momentum=0.9,nesterov=True" \
        --lr_scheduler_type cosine --max_steps 2000 --per_device_train_batch_size 32 \
        --eval_strategy steps --eval_steps 500 --save_strategy steps --save_steps 500

With local image folders (one sub-folder per class) use --train_dir/--validation_dir instead of
--dataset_name.
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from torchvision.transforms import (
    CenterCrop,
    Compose,
    Lambda,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from transformers import HfArgumentParser, default_data_collator

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments, compute_metrics, load_classifier


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="google/vit-base-patch16-224-in21k", metadata={"help": "Hub id or path."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Re-initialise a head of another size."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training examples."})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DEELBoTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name)
    else:
        files = {"train": f"{data_args.train_dir}/**"}
        if data_args.validation_dir is not None:
            files["validation"] = f"{data_args.validation_dir}/**"
        dataset = load_dataset("imagefolder", data_files=files)
    train = dataset["train"]
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(train))))
    labels = train.features[data_args.label_column_name].names

    model, processor, head_modules = load_classifier(
        model_args.model_name_or_path,
        len(labels),
        dict(enumerate(labels)),
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    training_args.head_modules = training_args.head_modules or head_modules

    size = processor.size.get("shortest_edge") or (processor.size["height"], processor.size["width"])
    normalize = Normalize(mean=processor.image_mean, std=processor.image_std)
    rgb = Lambda(lambda image: image.convert("RGB"))
    train_tf = Compose([rgb, RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
    eval_tf = Compose([rgb, Resize(size), CenterCrop(size), ToTensor(), normalize])

    def transform(tf):
        def apply(batch):
            return {
                "pixel_values": [tf(image) for image in batch[data_args.image_column_name]],
                "labels": batch[data_args.label_column_name],
            }

        return apply

    evaluation = dataset.get("validation")
    trainer = DEELBoTrainer(
        model=model,
        args=training_args,
        train_dataset=train.with_transform(transform(train_tf)),
        eval_dataset=evaluation.with_transform(transform(eval_tf)) if evaluation is not None else None,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,  # accuracy, NLL and ECE
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model()
    if evaluation is not None:
        print(trainer.evaluate())
    print("learned:", model.config.deelbo)
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path, dataset=data_args.dataset_name)


if __name__ == "__main__":
    main()
