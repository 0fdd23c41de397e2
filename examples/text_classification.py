"""DE ELBO for text classification with a tiny BERT-style model, offline.

    python examples/text_classification.py --output_dir bert-tiny-deelbo --max_steps 60

A 2-layer BERT is first trained on a source task (topic: sport or food) and then fine-tuned with
DE ELBO on a target task (sentiment) with a new classifier head; the backbone's prior is centred
on its source-task weights. With a Hub model, pass --model_name_or_path (e.g. prajjwal1/bert-tiny)
and the same script fine-tunes it on the built-in sentiment sentences.
"""

import copy
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    PreTrainedTokenizerFast,
)

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments

SUBJECTS = ["the match", "the team", "the striker", "the final", "the soup", "the pasta", "the cake", "the salad"]
GOOD = ["was wonderful", "was great fun", "made my day", "was superb", "was a delight"]
BAD = ["was awful", "was a disaster", "ruined my evening", "was terrible", "was a letdown"]


def sentences():
    """(text, topic, sentiment) for every subject × phrase: topic 0 = sport, 1 = food."""
    rows = []
    for i, subject in enumerate(SUBJECTS):
        for phrase, sentiment in [(p, 1) for p in GOOD] + [(p, 0) for p in BAD]:
            rows.append((f"{subject} {phrase}", int(i >= 4), sentiment))
    return rows


@dataclass
class ExampleArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id; default: a tiny BERT built here."})


def main():
    parser = HfArgumentParser((ExampleArguments, DEELBoTrainingArguments))
    example, args = parser.parse_args_into_dataclasses()
    rows = sentences()
    if example.model_name_or_path is None:
        words = sorted({w for text, _, _ in rows for w in text.split()})
        vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=2,
        )
        torch.manual_seed(args.seed)
        source_model = BertForSequenceClassification(config)
        encoded = tokenizer([t for t, _, _ in rows], padding="max_length", max_length=12, return_tensors="pt")
        optimizer = torch.optim.Adam(source_model.parameters(), lr=3e-3)
        for _ in range(30):  # the "pretraining": topic classification
            loss = source_model(**encoded, labels=torch.tensor([topic for _, topic, _ in rows])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model = copy.deepcopy(source_model)
        model.classifier.reset_parameters()  # a fresh head for the new task
    else:
        tokenizer = AutoTokenizer.from_pretrained(example.model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            example.model_name_or_path, num_labels=2, ignore_mismatched_sizes=True
        )

    texts = [t for t, _, _ in rows]
    data = Dataset.from_dict({"text": texts, "labels": [s for _, _, s in rows]})
    data = data.map(lambda b: tokenizer(b["text"], padding="max_length", max_length=12, truncation=True), batched=True)
    data = data.remove_columns("text").with_format("torch")
    parts = data.train_test_split(test_size=0.25, seed=args.seed, stratify_by_column=None)

    trainer = DEELBoTrainer(
        model=model, args=args, train_dataset=parts["train"], eval_dataset=parts["test"], processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model()
    print(trainer.evaluate())
    print("learned:", model.config.deelbo)


if __name__ == "__main__":
    main()
