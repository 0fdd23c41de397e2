"""`import hf_deelbo` is quiet: it changes nothing of the process that imported it (matplotlib's
backend and pyplot, logging handlers and levels, warning filters, torch's global settings), and
every third-party package the package imports is a declared dependency."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROCESS_STATE = r"""
import json, logging, sys, warnings
import matplotlib, torch, transformers
def state():
    return {
        "backend": matplotlib.rcParams._get_backend_or_none() if hasattr(matplotlib.rcParams, "_get_backend_or_none")
        else dict.__getitem__(matplotlib.rcParams, "backend"),
        "pyplot": "matplotlib.pyplot" in sys.modules,
        "handlers": {name: [type(h).__name__ for h in logging.getLogger(name).handlers]
                     for name in ["", "transformers", "torch", "matplotlib"]},
        "levels": {name: logging.getLogger(name).level for name in ["", "transformers", "torch", "matplotlib"]},
        "warnings": [repr(f) for f in warnings.filters],
        "torch": [str(torch.get_default_dtype()), torch.is_grad_enabled(), torch.get_num_threads(),
                  torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
                  torch.backends.cudnn.benchmark, torch.initial_seed()],
    }
matplotlib.use("svg")  # as a notebook user's own choice
# What the libraries themselves do when imported (scipy adds warning filters) is theirs: imported first.
import accelerate, datasets, huggingface_hub, safetensors, sklearn.model_selection, timm, transformers.trainer
before = state()
import hf_deelbo
after = state()
print(json.dumps({"before": before, "after": after}))
"""


def test_import_changes_nothing_of_the_process():
    result = subprocess.run([sys.executable, "-c", PROCESS_STATE], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    states = json.loads(result.stdout.strip().splitlines()[-1])
    assert states["before"]["backend"] == "svg"
    for key in states["before"]:
        assert states["after"][key] == states["before"][key], key


def _declared() -> set[str]:
    config = ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line for line in config["options"]["install_requires"].splitlines() if line.strip()]
    for text in config["options.extras_require"].values():
        lines += [line for line in text.splitlines() if line.strip() and not line.strip().startswith("%")]
    names = set()
    for line in lines:
        name = line.split(";")[0].strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.lower().replace("-", "_"))
    return names


# Import names that differ from their distributions' names.
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit_learn", "yaml": "pyyaml", "huggingface_hub": "huggingface_hub"}


def test_every_imported_third_party_package_is_declared():
    """Every module the package imports (at any depth, in functions too) that is neither the standard
    library nor the package itself comes from a distribution named in setup.cfg."""
    imported = set()
    for path in (ROOT / "hf_deelbo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "hf_deelbo"}
    declared = _declared()
    undeclared = sorted(
        name for name in third_party if DISTRIBUTIONS.get(name, name).lower().replace("-", "_") not in declared
    )
    assert not undeclared, f"imported but not declared in setup.cfg: {undeclared}"


def test_the_package_imports_where_fcntl_does_not_exist():
    """`fcntl` is POSIX-only: the output-directory lock imports it when it locks, so the package
    imports on any platform."""
    code = "import sys; sys.modules['fcntl'] = None; import hf_deelbo, hf_deelbo.cli.train; print('imported')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]
