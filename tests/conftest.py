"""Offline, tiny, isolated: every model is built from a config, nothing reaches the network."""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The Hub is a local server (tests/hub_server.py) on a port chosen here, before huggingface_hub is
# imported (it reads HF_ENDPOINT once). With no server running, a Hub request is refused at once.
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
# Each process (the xdist controller and every worker) has its own, removed when it exits.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_deelbo_tests_hf_home_")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ["HF_TOKEN"] = "hf_local_test_token"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_OFFLINE"] = "0"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from hf_deelbo import DEELBoTrainingArguments  # noqa: E402

NUM_LABELS = 5
IMAGE_SIZE = 32


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort keeps the order within each kind): with two xdist workers
    the long runs start early and the short tests fill the gaps at the end, instead of one worker
    finishing a long test alone while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def build_model(kind: str, seed: int = 0):
    """A tiny classifier of `kind`, and the head module names it must be detected with."""
    import timm
    import transformers as tf

    torch.manual_seed(seed)
    vit_like = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=NUM_LABELS,
    )
    if kind == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**vit_like)), ["classifier"]
    if kind == "deit":
        return tf.DeiTForImageClassification(tf.DeiTConfig(**vit_like)), ["classifier"]
    if kind == "deit_distilled":
        model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**vit_like))
        return model, ["cls_classifier", "distillation_classifier"]
    if kind == "beit":
        return tf.BeitForImageClassification(tf.BeitConfig(**vit_like)), ["classifier"]
    if kind == "swin":
        config = tf.SwinConfig(
            image_size=IMAGE_SIZE,
            patch_size=2,
            num_channels=3,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=2,
            num_labels=NUM_LABELS,
        )
        return tf.SwinForImageClassification(config), ["classifier"]
    if kind == "convnext":
        config = tf.ConvNextConfig(
            num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS
        )
        return tf.ConvNextForImageClassification(config), ["classifier"]
    if kind == "resnet":
        config = tf.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS
        )
        return tf.ResNetForImageClassification(config), ["classifier"]
    if kind == "bert":
        config = tf.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=NUM_LABELS,
        )
        return tf.BertForSequenceClassification(config), ["classifier"]
    if kind == "timm_wrapper":
        config = tf.TimmWrapperConfig(architecture="test_resnet", num_labels=NUM_LABELS)
        return tf.TimmWrapperForImageClassification(config), ["timm_model.fc"]
    if kind == "timm":
        return timm.create_model("test_resnet", pretrained=False, num_classes=NUM_LABELS), ["fc"]
    if kind == "timm_vit":
        return timm.create_model("test_vit", pretrained=False, num_classes=NUM_LABELS, img_size=IMAGE_SIZE), ["head"]
    raise ValueError(kind)


class TinyNet(torch.nn.Module):
    """A 3-layer MLP on 6 numbers (any input shape flattening to 6), head named `head`: small
    enough for float64 finite differences."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh())
        self.head = torch.nn.Linear(4, 3)

    def forward(self, pixel_values):
        return self.head(self.body(pixel_values.flatten(1)))


def image_dataset(num_examples: int = 16, seed: int = 0, image_size: int = IMAGE_SIZE) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_examples, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (num_examples,), generator=generator)
    return Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": labels.numpy()}).with_format("torch")


def text_dataset(num_examples: int = 16, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 64, (num_examples, 8), generator=generator)
    labels = torch.randint(0, NUM_LABELS, (num_examples,), generator=generator)
    return Dataset.from_dict(
        {
            "input_ids": input_ids.numpy(),
            "attention_mask": torch.ones_like(input_ids).numpy(),
            "labels": labels.numpy(),
        }
    ).with_format("torch")


def training_args(tmp_path, **overrides) -> DEELBoTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=4,
        learning_rate=0.01,
        report_to="none",
        save_strategy="no",
        logging_steps=2,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    values.update(overrides)
    return DEELBoTrainingArguments(**values)


@pytest.fixture(scope="session")
def local_hub():
    """The local Hub server for this test session (one per xdist worker)."""
    from hub_server import LocalHub

    hub = LocalHub(HUB_PORT).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(local_hub):
    """The local Hub, started and accepting writes (a test may stop it or make it refuse)."""
    if local_hub.server is None:
        local_hub.start()
    local_hub.state.refuse_writes = local_hub.state.refuse_commits = local_hub.state.hang_commits = None
    yield local_hub
    if local_hub.server is None:
        local_hub.start()
    local_hub.state.refuse_writes = local_hub.state.refuse_commits = local_hub.state.hang_commits = None


def shared_dir(tmp_path_factory, name: str):
    """A directory of this test run shared by its xdist workers (their base temp's parent), so that
    what is expensive to build (pretrained backbones) is built once per run, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    path.mkdir(exist_ok=True)
    return path


ROOT = Path(__file__).parent.parent
BENCHMARKS = ROOT / "benchmarks"
if str(ROOT) not in sys.path:  # the benchmarks package, as `python -m benchmarks.<name>` runs it
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def benchmark_backbone(tmp_path_factory):
    """The benchmarks' pretrained timm ResNet (benchmarks/transfer.py's `pretrained_path`), built
    once per test run and shared by the benchmark tests, which would each build it again."""
    from huggingface_hub.utils import WeakFileLock

    from benchmarks import transfer

    cache = shared_dir(tmp_path_factory, "benchmark_pretrained")
    with WeakFileLock(cache / "build.lock"):
        return transfer.pretrained_path("timm-resnet", str(cache))


def with_benchmark_backbone(output_dir, backbone: str) -> None:
    """OUTPUT_DIR/pretrained/ as a benchmark script caches it, holding the shared backbone."""
    (output_dir / "pretrained").mkdir(parents=True, exist_ok=True)
    os.symlink(backbone, output_dir / "pretrained" / os.path.basename(backbone))


def run_benchmark(script: str, *arguments, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<script's name>` with `arguments`, from the repository's root, in a
    subprocess of this environment; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{Path(script).stem}", *map(str, arguments)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session", autouse=True)
def digits_backbone_cache(tmp_path_factory):
    """One pretrained digits backbone per test run (the command line builds it on first use; the
    workers that need it at the same time wait for the one building it)."""
    path = shared_dir(tmp_path_factory, "hf_deelbo_cache")
    os.environ["HF_DEELBO_CACHE"] = str(path)
    return path


@pytest.fixture
def make_args(tmp_path):
    return lambda **overrides: training_args(tmp_path, **overrides)


@pytest.fixture(autouse=True)
def default_sigint():
    """Every test starts with Python's own Ctrl-C behaviour (SIGINT raises KeyboardInterrupt in the
    main thread, unblocked), whatever an earlier test in the same worker process left behind: the
    interruption tests send real SIGINTs."""
    import signal

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    yield
    signal.signal(signal.SIGINT, handler)
