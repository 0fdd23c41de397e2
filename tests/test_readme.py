"""The README's command-line block, run as written: the model id is served by the local Hub (a tiny
ViT uploaded under the README's id) and `beans` is replaced by a local dataset directory with the
same splits and columns (`image`, `labels`)."""

import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_deelbo.cli import main

README = Path(__file__).parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    """The `hf-deelbo ...` commands of the README's "Command line" block, as argv lists."""
    text = README.read_text()
    block = text.split("Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.strip():
            commands.append(shlex.split(line))
    assert commands and all(c[0] == "hf-deelbo" for c in commands), commands
    return commands


def _beans_like(root: Path) -> Path:
    """Parquet splits with the columns of the Hub's `beans`: `image` and the class label `labels`."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = Features({"image": ImageFeature(), "labels": ClassLabel(names=["angular", "bean_rust", "healthy"])})
    root.mkdir()
    for split, start, count in (("train", 0, 6), ("validation", 6, 3)):
        images, labels = [], []
        for label, digit in enumerate((5, 6, 7)):
            for image in digits.images[digits.target == digit][start : start + count]:
                images.append(Image.fromarray((image * 255 / 16).astype("uint8")).convert("RGB"))
                labels.append(label)
        Dataset.from_dict({"image": images, "labels": labels}, features=features).to_parquet(root / f"{split}.parquet")
    return root


@pytest.mark.slow
def test_readme_command_line_block_runs_as_written(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    commands = readme_commands()
    model_id = next(c[c.index("--model_name_or_path") + 1] for c in commands if "--model_name_or_path" in c)
    torch.manual_seed(0)
    tiny = tmp_path / "tiny-vit"
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    ViTForImageClassification(config).save_pretrained(tiny)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tiny)
    api = HfApi()
    api.create_repo(model_id, exist_ok=True)
    api.upload_folder(repo_id=model_id, folder_path=str(tiny))
    beans = _beans_like(tmp_path / "beans")
    monkeypatch.chdir(tmp_path)
    # 2000 steps of a 5k-parameter model: one thread per process is fastest (no oversubscription)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = []
    try:
        for argv in commands:
            argv = [str(beans) if a == "beans" else a for a in argv]
            status = main(argv[1:])
            captured = capsys.readouterr()
            assert status == 0, (argv, captured.err[-2000:])
            printed.append(captured.out)
    finally:
        torch.set_num_threads(threads)
    train, show, evaluate, push = commands
    out = tmp_path / train[train.index("--output_dir") + 1]
    assert (out / "model.safetensors").is_file()
    assert "lambda" in printed[1] and "BMA over 8 draws" in printed[2]
    repo_id = push[push.index("--repo_id") + 1]
    assert "model.safetensors" in api.list_repo_files(repo_id)
