"""`make demo` as a new user runs it: twice in a row, into a folder git ignores, saying where."""

import os
import shlex
import subprocess
from pathlib import Path

from hf_deelbo.cli import main

ROOT = Path(__file__).parent.parent


def make_demo_argv() -> list[str]:
    """The `hf-deelbo` arguments of `make demo`'s recipe, as make would run them."""
    recipe = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/bin/.installed", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [line for line in recipe.splitlines() if "hf-deelbo" in line]
    assert len(lines) == 1, recipe
    argv = shlex.split(lines[0])
    assert os.path.basename(argv[0]) == "hf-deelbo" and argv[1] == "train", argv
    return argv[1:]


def test_make_demo_runs_twice_into_an_ignored_folder(tmp_path, monkeypatch, capsys):
    argv = make_demo_argv()
    output_dir = argv[argv.index("--output_dir") + 1]
    assert not os.path.isabs(output_dir)
    ignored = subprocess.run(["git", "check-ignore", "-q", output_dir], cwd=ROOT)
    assert ignored.returncode == 0, f"{output_dir} is not ignored by git"

    monkeypatch.chdir(tmp_path)
    short = ["--max_steps", "2", "--max_train_samples", "10", "--max_eval_samples", "10", "--disable_tqdm", "true"]
    for _ in range(2):  # the second run replaces the first's output instead of refusing
        assert main(argv + short) == 0
        out = capsys.readouterr().out
        assert f"written to {tmp_path / output_dir}" in out
    assert (tmp_path / output_dir / "model.safetensors").is_file()
