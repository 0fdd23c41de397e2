"""Each example runs end to end, offline, at a reduced size."""

import json
import os
import subprocess
import sys

import pytest
from test_cli import _image_folder, tiny_vit_dir  # noqa: F401 - fixture

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
COMMON = [
    "--max_steps",
    "4",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "no",
    "--per_device_train_batch_size",
    "8",
    "--use_cpu",
    "true",
]


def _run(script, *flags):
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *flags, *COMMON],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _card_snippet_runs(out, task: str) -> str:
    """The saved model card's pipeline tag is `task`, and its "How to use" code runs as written,
    printing the learned values; returns what it printed."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == task and task in card.data.tags
    snippet = card.text.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )
    assert result.returncode == 0, snippet + result.stderr[-2000:]
    assert "'lambda'" in result.stdout
    return snippet


def test_run_image_classification_on_an_image_folder(tmp_path, tiny_vit_dir):  # noqa: F811
    folder = _image_folder(tmp_path / "images")
    out = tmp_path / "out"
    stdout = _run(
        "run_image_classification.py",
        "--model_name_or_path",
        str(tiny_vit_dir),
        "--train_dir",
        str(folder),
        "--ignore_mismatched_sizes",
        "true",
        "--output_dir",
        str(out),
        "--remove_unused_columns",
        "false",
    )
    assert "learned:" in stdout
    assert json.loads((out / "config.json").read_text())["deelbo"]["head_modules"] == ["classifier"]
    assert "AutoModelForImageClassification" in _card_snippet_runs(out, "image-classification")


@pytest.mark.slow
def test_timm_example_on_the_digits(tmp_path):
    out = tmp_path / "out"
    stdout = _run("timm_fine_tune.py", "--output_dir", str(out), "--num_train_examples_kept", "40")
    assert "test accuracy" in stdout
    assert "deelbo" in json.loads((out / "config.json").read_text())


def test_text_classification_example(tmp_path):
    out = tmp_path / "out"
    stdout = _run("text_classification.py", "--output_dir", str(out))
    assert "learned:" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["deelbo"]["head_modules"] == ["classifier"]
    assert config["problem_type"] == "single_label_classification"
    # the card follows the model: a text classifier, loaded by the Auto class of its task
    assert "AutoModelForSequenceClassification" in _card_snippet_runs(out, "text-classification")
