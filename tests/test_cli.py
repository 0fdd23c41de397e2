"""The `hf-deelbo` command, run in-process through its entry point."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from hf_deelbo.cli import main
from hf_deelbo.cli.train import parse_train_args

# From transformers' examples/pytorch/image-classification/README.md
RUN_IMAGE_CLASSIFICATION_README = """
    --dataset_name beans --output_dir ./beans_outputs/ --remove_unused_columns False --label_column_name labels
    --do_train --do_eval --push_to_hub --push_to_hub_model_id vit-base-beans --learning_rate 2e-5
    --num_train_epochs 1 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --logging_strategy steps
    --logging_steps 10 --eval_strategy epoch --save_strategy epoch --load_best_model_at_end True
    --save_total_limit 3 --seed 1337
"""


def test_accepts_run_image_classification_flags():
    model_args, data_args, training_args, _ = parse_train_args(RUN_IMAGE_CLASSIFICATION_README.split())
    assert data_args.dataset_name == "beans" and data_args.label_column_name == "labels"
    assert model_args.model_name_or_path == "google/vit-base-patch16-224-in21k"  # the script's default
    assert training_args.hub_model_id == "vit-base-beans" and training_args.push_to_hub
    assert training_args.learning_rate == 2e-5 and training_args.seed == 1337
    assert training_args.load_best_model_at_end and training_args.save_total_limit == 3
    assert str(training_args.eval_strategy.value) == "epoch"
    _, data_args, training_args, _ = parse_train_args(
        [
            "--model_name_or_path",
            "x/y",
            "--train_dir",
            "a",
            "--validation_dir",
            "b",
            "--image_column_name",
            "img",
            "--max_train_samples",
            "10",
            "--ignore_mismatched_sizes",
            "true",
            "--output_dir",
            "o",
            "--kappa",
            "3",
        ]
    )
    assert (data_args.train_dir, data_args.validation_dir, data_args.image_column_name) == ("a", "b", "img")
    assert training_args.kappa == 3.0


def test_config_file_values_and_command_line_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.5\nmax_steps: 7\nhead_modules: [fc, head]\noutput_dir: from_file\n")
    _, _, training_args, _ = parse_train_args(["--config_file", str(config), "--max_steps", "9"])
    assert training_args.learning_rate == 0.5 and training_args.max_steps == 9
    assert training_args.head_modules == ["fc", "head"] and training_args.output_dir == "from_file"
    # the embedded default keeps its own defaults for what the file does not set
    assert training_args.lr_scheduler_type.value == "cosine"


def _image_bytes(dataset) -> set[bytes]:
    import numpy as np

    return {np.asarray(image).tobytes() for image in dataset.with_format(None)["image"]}


@pytest.mark.parametrize("seed", [7, 42])
def test_evaluate_rebuilds_the_split_train_recorded(seed, tmp_path):
    from hf_deelbo.cli.assembly import embedded_inputs, record_split
    from hf_deelbo.cli.common import DataTrainingArguments
    from hf_deelbo.cli.data import read_split_record
    from hf_deelbo.cli.evaluate import evaluation_data

    argv = ["--output_dir", str(tmp_path / "run"), "--max_train_samples", "60", "--seed", str(seed)]
    _, data_args, training_args, _ = parse_train_args(argv)
    inputs = embedded_inputs(data_args, training_args)  # what train trains and tests on
    train, test = inputs.train, inputs.evaluation
    record_split(True, data_args, training_args, train, test)
    record = read_split_record(str(tmp_path / "run"))
    evaluated, description = evaluation_data(record, DataTrainingArguments(), None, None, None)
    assert not _image_bytes(evaluated) & _image_bytes(train)
    assert _image_bytes(evaluated) == _image_bytes(test) and f"seed {seed}" in description


@pytest.mark.slow
def test_main_job_on_the_embedded_default(tmp_path, capsys):
    import re

    import timm

    from hf_deelbo.cli.assembly import embedded_inputs
    from hf_deelbo.cli.common import DataTrainingArguments
    from hf_deelbo.cli.data import read_split_record
    from hf_deelbo.cli.evaluate import evaluation_data

    out = tmp_path / "run"
    argv = [
        "--output_dir",
        str(out),
        "--max_steps",
        "20",
        "--max_train_samples",
        "50",
        "--logging_steps",
        "5",
        "--disable_tqdm",
        "true",
        "--seed",
        "7",
    ]
    code = main(["train", *argv])
    assert code == 0
    for name in (
        "model.safetensors",
        "config.json",
        "README.md",
        "deelbo_hyperparameters.png",
        "training_loss.png",
        "reliability_diagram.png",
        "data_split.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    deelbo = config["deelbo"]
    assert deelbo["num_train_examples"] == 50
    trained = capsys.readouterr().out
    assert f"{deelbo['lambda']:.4g}" in trained
    card = (out / "README.md").read_text()
    assert "deelbo" in card and f"{deelbo['tau']:.4g}" in card

    # The card's "How to use" loads this (unpushed) directory, and config.json describes these
    # weights: 32×32 digits normalised with mean = std = 0.5, none of timm's ImageNet provenance.
    usage = card.split("## How to use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert f'"local-dir:{out}"' in usage and "hf-hub:" not in usage
    namespace = {}
    exec(usage, namespace)
    assert isinstance(namespace["model"], torch.nn.Module) and namespace["model"].num_classes == 5
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 32, 32]
    assert pretrained_cfg["mean"] == pretrained_cfg["std"] == [0.5, 0.5, 0.5]
    assert not {"tag", "url", "hf_hub_id", "origin_url", "test_input_size"} & set(pretrained_cfg)
    assert timm.data.resolve_data_config({}, model=namespace["model"])["input_size"] == (3, 32, 32)

    # evaluate scores the examples train held out (recorded with the run), none of the training ones,
    # and reproduces train's test accuracy
    record = read_split_record(str(out))
    assert record["seed"] == 7 and record["source"] == "embedded digits" and record["num_train_examples"] == 50
    _, data_args, training_args, _ = parse_train_args(argv)  # train's own data, rebuilt
    inputs = embedded_inputs(data_args, training_args)
    train, test = inputs.train, inputs.evaluation
    evaluated, _ = evaluation_data(record, DataTrainingArguments(), None, None, None)
    assert len(evaluated) == len(test) == record["num_eval_examples"]
    assert not _image_bytes(evaluated) & _image_bytes(train)
    assert _image_bytes(evaluated) == _image_bytes(test)
    train_accuracy = re.search(r"Test accuracy (\S+)", trained).group(1)

    # show prints the values the run logged last (λ after the final optimizer step)
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"{deelbo['lambda']:.6g}" in shown and f"{deelbo['tau']:.6g}" in shown

    assert main(["evaluate", "--model_name_or_path", str(out)]) == 0
    mean_line = capsys.readouterr().out
    assert "posterior mean" in mean_line and "held out by the run, seed 7" in mean_line
    assert f"accuracy {train_accuracy}" in mean_line
    assert main(["evaluate", "--model_name_or_path", str(out), "--bma_samples", "3"]) == 0
    assert "BMA over 3 draws" in capsys.readouterr().out


def _image_folder(root, classes=("5", "6", "7"), per_class=4):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name in classes:
        (root / name).mkdir(parents=True)
        images = digits.images[digits.target == int(name)][:per_class]
        for i, image in enumerate(images):
            Image.fromarray((image * 255 / 16).astype("uint8")).convert("RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture
def tiny_vit_dir(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    path = tmp_path / "tiny-vit"
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_train_on_an_image_folder_with_a_transformers_model(tmp_path, tiny_vit_dir, capsys):
    folder = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(tiny_vit_dir),
            "--train_dir",
            str(folder),
            "--ignore_mismatched_sizes",
            "true",
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--remove_unused_columns",
            "false",
        ]
    )
    assert code == 0
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 3 and model.config.deelbo["head_modules"] == ["classifier"]
    assert (out / "preprocessor_config.json").is_file()


BAD_INPUTS = [
    (
        ["--model_name_or_path", "./no/such/model", "--train_dir", "IMAGES"],
        "--model_name_or_path './no/such/model' is not a directory",
    ),
    (
        ["--model_name_or_path", "MODEL", "--train_dir", "IMAGES", "--image_column_name", "picture"],
        "--image_column_name 'picture' not found",
    ),
    (
        ["--model_name_or_path", "MODEL", "--train_dir", "IMAGES", "--label_column_name", "class"],
        "--label_column_name 'class' not found",
    ),
    (["--kappa", "0"], "kappa must be > 0 or None (None means D/N); got 0.0"),
    (["--kappa", "-3"], "kappa must be > 0 or None (None means D/N); got -3.0"),
    (["--config_file", "MISSING.yaml"], "--config_file"),
    (["--config_file", "BROKEN.json"], "is not valid JSON/YAML"),
    (["--weight_decay", "0.1"], "weight_decay must be 0"),
    (["--objective_batch_norm", "mean"], "objective_batch_norm must be 'batch'"),
    (["--train_dir", "NOT_A_DIR", "--model_name_or_path", "MODEL"], "--train_dir"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS)
def test_bad_input_exits_with_one_line(flags, message, tmp_path, tiny_vit_dir, capsys):
    folder = _image_folder(tmp_path / "images", per_class=2)
    (tmp_path / "broken.json").write_text("{not json")
    replace = {
        "IMAGES": str(folder),
        "MODEL": str(tiny_vit_dir),
        "MISSING.yaml": str(tmp_path / "missing.yaml"),
        "BROKEN.json": str(tmp_path / "broken.json"),
        "NOT_A_DIR": str(tmp_path / "nothing"),
    }
    out = tmp_path / "run"
    argv = ["train", "--output_dir", str(out), "--max_steps", "1", *[replace.get(f, f) for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hf-deelbo")]
    assert len(errors) == 1 and errors[0].startswith("hf-deelbo train: error: ") and message in errors[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_train_help_is_short_led_by_the_method_and_shows_the_defaults_that_apply(capsys):
    assert main(["train", "--help"]) == 0
    short = capsys.readouterr().out
    assert main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    flags = [line.split()[0] for line in short.splitlines() if line.startswith("  --")]
    assert len(short.splitlines()) < 200 and len(flags) < 60
    assert flags.index("--kappa") < flags.index("--model_name_or_path") < flags.index("--dataset_name")
    assert flags.index("--dataset_name") < flags.index("--learning_rate")
    assert flags[flags.index("--kappa") - 1] == "--help-all"  # the method's flags come first
    assert "--gradient_checkpointing" not in short and "--gradient_checkpointing" in full
    # what applies with a dataset (TrainingArguments' default), and the embedded task's own
    learning_rate = short.split("  --learning_rate LEARNING_RATE", 1)[1].split("\n  --", 1)[0]
    assert "default: 5e-05; embedded digits task: 0.03" in " ".join(learning_rate.split())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--kappa", "abc"], "argument --kappa: invalid float value: 'abc'"),
        (["train", "--max_step", "5"], "unknown flag --max_step; did you mean --max_steps?"),
        (["train", "--optim", "adamw_pytorch"], "argument --optim: invalid choice: 'adamw_pytorch'"),
        (["evaluate", "--model_name_or_path", "x", "--bma_sample", "2"], "unknown flag --bma_sample; did you mean"),
        (["show", "x", "--jso"], "unrecognized arguments: --jso"),
    ],
)
def test_bad_flags_fail_in_one_line_without_prefix_matching(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert captured.err.startswith(f"hf-deelbo {argv[0]}: error: ")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, what",
    [
        (
            ["train", "--dataset_name", "tester/beans", "--model_name_or_path", "MODEL"],
            "--dataset_name 'tester/beans'",
        ),
        (
            ["train", "--train_dir", "IMAGES", "--model_name_or_path", "tester/vit"],
            "--model_name_or_path 'tester/vit'",
        ),
        (["evaluate", "--model_name_or_path", "tester/vit"], "--model_name_or_path 'tester/vit'"),
        (["show", "tester/vit"], "'tester/vit' is on the Hub"),
    ],
)
def test_unreachable_hub_fails_fast_in_one_line(argv, what, hub, tmp_path, tiny_vit_dir, monkeypatch, capsys):
    import time

    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # conftest makes datasets offline
    folder = _image_folder(tmp_path / "images", per_class=2)
    argv = [{"MODEL": str(tiny_vit_dir), "IMAGES": str(folder)}.get(a, a) for a in argv]
    hub.stop()  # connections to the Hub are refused, as on a machine without network
    start = time.monotonic()
    assert main([*argv, *(["--output_dir", str(tmp_path / "run")] if argv[0] == "train" else [])]) == 2
    assert time.monotonic() - start < 10  # no minute of retries
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert what in err and "cannot be reached" in err and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "run").exists()


def test_offline_mode_names_a_dataset_missing_from_the_cache(tmp_path, tiny_vit_dir, capsys):
    # conftest sets HF_DATASETS_OFFLINE=1: only cached datasets load
    argv = [
        "train",
        "--dataset_name",
        "tester/beans",
        "--model_name_or_path",
        str(tiny_vit_dir),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dataset_name 'tester/beans' is not in the local cache" in err, err


def test_existing_output_dir_is_protected(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("previous run")
    assert main(["train", "--output_dir", str(out), "--max_steps", "1"]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "previous run"


def test_unknown_command_and_help(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert main(["--help"]) == 0


@pytest.mark.slow
def test_learning_rate_selection_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--output_dir",
            str(out),
            "--max_steps",
            "6",
            "--max_train_samples",
            "30",
            "--learning_rates",
            "0.05",
            "0.001",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    selection = json.loads((out / "learning_rate_selection.json").read_text())
    scores = {run["learning_rate"]: run["training_objective"] for run in selection["runs"]}
    assert set(scores) == {0.05, 0.001}
    assert selection["chosen"]["learning_rate"] == min(scores, key=scores.get)
    chosen = next(run for run in selection["runs"] if run["learning_rate"] == selection["chosen"]["learning_rate"])
    assert chosen["learned"]["sigma"] == json.loads((out / "config.json").read_text())["deelbo"]["sigma"]
    assert "chosen" in capsys.readouterr().out
    assert not any(p.name.startswith("lr-") for p in out.iterdir())  # the losing runs leave nothing behind
    assert json.loads((out / "config.json").read_text())["deelbo"]["num_train_examples"] == 30


def test_an_arguments_file_is_typed_as_the_command_line(tmp_path):
    """Values of an arguments file go through each flag's own type, as on the command line: a number
    for a path flag reads as its text, a scalar for a list flag as a list of one, a list or mapping is
    kept for a flag whose field takes one (report_to, lr_scheduler_kwargs)."""
    from hf_deelbo.cli.train import parse_train_args

    path = tmp_path / "args.json"
    path.write_text(
        json.dumps(
            {
                "output_dir": 5,
                "learning_rates": 0.1,
                "max_steps": "7",
                "kappa": 3,
                "report_to": ["none"],
                "lr_scheduler_kwargs": {"num_cycles": 0.5},
                "do_train": "true",
            }
        )
    )
    _, _, training_args, run_args = parse_train_args(["--config_file", str(path)])
    assert training_args.output_dir == "5" and training_args.max_steps == 7 and training_args.kappa == 3.0
    assert run_args.learning_rates == [0.1] and training_args.report_to == []  # ["none"], normalised
    assert training_args.lr_scheduler_kwargs == {"num_cycles": 0.5} and training_args.do_train is True


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help-all"], ["--version"]])
def test_help_and_version_go_to_stdout_and_a_closed_pipe_ends_quietly(argv):
    """As any command line tool: help and --version on stdout, status 0; a reader that closes the pipe
    at once (`| head`) gets no traceback."""
    command = [os.path.join(os.path.dirname(sys.executable), "hf-deelbo"), *argv]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() and not result.stderr, result.stderr[-500:]
    if argv == ["--version"]:
        from hf_deelbo import __version__

        assert result.stdout.strip() == f"hf-deelbo {__version__}"
    closed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    closed.stdout.close()  # the reader is gone before the first line
    stderr = closed.stderr.read().decode()
    closed.wait()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
