"""`hf-deelbo train` behaves as transformers' run_image_classification.py where they overlap: a
single positional arguments file, --do_train / --do_eval, and the results files of
`trainer.save_metrics`."""

import json

import pytest
from test_cli import _image_folder, tiny_vit_dir  # noqa: F401 - the fixture

from hf_deelbo.cli import main
from hf_deelbo.cli.train import parse_train_args


def test_a_positional_arguments_file_sets_typed_defaults(tmp_path):
    args_file = tmp_path / "args.yaml"
    args_file.write_text(
        "learning_rate: 0.5\nmax_steps: 7\nhead_modules: [fc, head]\noutput_dir: from_file\n"
        "lr_scheduler_type: cosine_with_restarts\nlr_scheduler_kwargs: {num_cycles: 2}\nkappa: 3\n"
    )
    _, _, training_args, _ = parse_train_args([str(args_file)])
    assert training_args.learning_rate == 0.5 and training_args.max_steps == 7 and training_args.kappa == 3
    assert training_args.head_modules == ["fc", "head"] and training_args.output_dir == "from_file"
    assert training_args.lr_scheduler_kwargs == {"num_cycles": 2}  # a dict stays a dict
    assert training_args.do_train and training_args.do_eval  # neither given: train does both
    json_file = tmp_path / "args.json"
    json_file.write_text(json.dumps({"max_steps": 5, "do_train": True}))
    _, _, training_args, _ = parse_train_args([str(json_file)])
    assert training_args.max_steps == 5 and training_args.do_train and not training_args.do_eval


def test_an_arguments_file_key_that_is_no_flag_is_one_line(tmp_path, capsys):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"max_step": 5}))
    assert main(["train", str(args_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sets 'max_step', which is no flag" in err[0] and "did you mean 'max_steps'" in err[0]


def _train(tmp_path, model_dir, *flags):
    folder = tmp_path / "images"
    if not folder.exists():
        _image_folder(folder)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(model_dir),
            "--train_dir",
            str(folder),
            "--ignore_mismatched_sizes",
            "true",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--train_val_split",
            "0.25",
            *flags,
        ]
    )
    assert code == 0
    return out


def test_train_writes_the_results_files(tmp_path, tiny_vit_dir):  # noqa: F811
    out = _train(tmp_path, tiny_vit_dir)
    train_results = json.loads((out / "train_results.json").read_text())
    eval_results = json.loads((out / "eval_results.json").read_text())
    all_results = json.loads((out / "all_results.json").read_text())
    assert {"train_runtime", "train_loss"} <= set(train_results)
    assert {"eval_accuracy", "eval_nll", "eval_ece", "eval_loss"} <= set(eval_results)
    assert all_results == {**train_results, **eval_results}
    assert eval_results["eval_loss"] == eval_results["eval_nll"]


@pytest.mark.parametrize("flag", ["--do_train", "--do_eval"])
def test_do_train_and_do_eval_are_honoured(flag, tmp_path, tiny_vit_dir):  # noqa: F811
    out = _train(tmp_path, tiny_vit_dir, flag)
    if flag == "--do_train":
        assert (out / "model.safetensors").is_file() and (out / "train_results.json").is_file()
        assert not (out / "eval_results.json").exists() and not (out / "reliability_diagram.png").exists()
    else:
        assert (out / "eval_results.json").is_file()
        assert not (out / "model.safetensors").exists() and not (out / "train_results.json").exists()
