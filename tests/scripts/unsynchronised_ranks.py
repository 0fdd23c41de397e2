"""Builds a DEELBoTrainer on each rank of a launch without `use_cpu=True` on a CPU machine, where
the Trainer does not synchronise the ranks; the trainer must refuse. Usage:

    torchrun --standalone --nproc_per_node 2 tests/scripts/unsynchronised_ranks.py OUTPUT_DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import conftest  # noqa: E402  (offline environment, tiny models)

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments  # noqa: E402

model, _ = conftest.build_model("resnet")
args = DEELBoTrainingArguments(output_dir=sys.argv[1], max_steps=1, report_to="none")
DEELBoTrainer(model=model, args=args, train_dataset=conftest.image_dataset(8))
print("built a trainer whose ranks are not synchronised")
