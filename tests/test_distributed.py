"""Multi-process training on CPU with gloo, through the real launchers (torchrun, accelerate)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hf_deelbo import DEELBoTrainer, DEELBoTrainingArguments

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_train.py")
BIN = os.path.dirname(sys.executable)


def _launch(command, tmp_path, name, *script_args):
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        command + [SCRIPT, str(out), "4" if "single" not in name else "8", *script_args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2 if "single" not in name else 1)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return _launch([sys.executable], tmp_path_factory.mktemp("single"), "single")[1][0]


LAUNCHERS = {
    "torchrun": [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"],
    "accelerate": [
        os.path.join(BIN, "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29541",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_agree_with_each_other_and_with_one(launcher, tmp_path, single_process):
    out, (rank0, rank1) = _launch(LAUNCHERS[launcher], tmp_path, launcher)
    assert rank0["world_size"] == rank1["world_size"] == 2
    # identical on every rank: weights (checksum), λ, τ, σ and ρ
    assert rank0["weights_sha"] == rank1["weights_sha"]
    assert rank0["learned"] == rank1["learned"] and rank0["rho"] == rank1["rho"]
    # the same run as one process with the same global batch (2 × 4 = 8): the noise draw is the
    # same (same seed on every rank), so only the order of floating-point sums differs.
    np.testing.assert_allclose(rank0["weights"], single_process["weights"], rtol=0, atol=1e-6)
    for key in ("lambda", "tau", "sigma"):
        assert rank0["learned"][key] == pytest.approx(single_process["learned"][key], rel=1e-5), key
    # logged values are reduced over ranks: they equal the single process's
    logged = [e["nll"] for e in rank0["log_history"] if "nll" in e]
    single = [e["nll"] for e in single_process["log_history"] if "nll" in e]
    np.testing.assert_allclose(logged, single, rtol=1e-5)
    # the config is written once, by the main process, with the learned values
    assert json.loads((out / "config.json").read_text())["deelbo"] == rank0["learned"]


@pytest.mark.slow
def test_layer_wise_prior_variances_agree_across_two_processes_and_with_one(tmp_path):
    """prior_variance_grouping="layer" under DDP (torchrun): every λ_l is the same on both ranks
    and matches one process with the same global batch."""
    grouping = ("in_place", "layer")
    _, (single,) = _launch([sys.executable], tmp_path, "single-layer", *grouping)
    out, (rank0, rank1) = _launch(LAUNCHERS["torchrun"], tmp_path, "torchrun-layer", *grouping)
    assert rank0["weights_sha"] == rank1["weights_sha"]
    assert rank0["learned"] == rank1["learned"] and rank0["learned"]["prior_variance_grouping"] == "layer"
    np.testing.assert_allclose(rank0["weights"], single["weights"], rtol=0, atol=1e-6)
    per_tensor, single_per_tensor = (
        rank0["learned"]["backbone_prior_variances"],
        single["learned"]["backbone_prior_variances"],
    )
    assert list(per_tensor) == list(single_per_tensor) and len(per_tensor) > 1
    np.testing.assert_allclose(list(per_tensor.values()), list(single_per_tensor.values()), rtol=1e-5)
    for key in ("lambda", "tau", "sigma"):
        assert rank0["learned"][key] == pytest.approx(single["learned"][key], rel=1e-5), key
    assert json.loads((out / "config.json").read_text())["deelbo"] == rank0["learned"]


@pytest.mark.slow
def test_diagonal_posterior_agrees_across_two_processes_and_with_one(tmp_path):
    """posterior_covariance="diagonal" under DDP (torchrun): every ρ_i is all-reduced, so it is the same on
    both ranks, and it matches one process with the same global batch."""
    options = ("in_place", "layer", "diagonal")
    _, (single,) = _launch([sys.executable], tmp_path, "single-diagonal", *options)
    out, (rank0, rank1) = _launch(LAUNCHERS["torchrun"], tmp_path, "torchrun-diagonal", *options)
    assert rank0["weights_sha"] == rank1["weights_sha"] and rank0["rho"] == rank1["rho"]
    assert rank0["learned"] == rank1["learned"] and rank0["learned"]["posterior_covariance"] == "diagonal"
    assert len(rank0["rho"]) == len(rank0["weights"]) and len(set(rank0["rho"])) > 1  # one ρ_i per weight, moved
    np.testing.assert_allclose(rank0["weights"], single["weights"], rtol=0, atol=1e-6)
    # ρ's Adam divides each coordinate's step by its own gradient scale. The attention's key bias has
    # a data gradient of exactly 0 in exact arithmetic (softmax ignores a shift shared by all keys),
    # so its ρ_i step on rounding noise, which the all-reduce changes; every other ρ_i agrees.
    names = np.asarray(single["rho_names"])
    assert names.tolist() == rank0["rho_names"] and len(names) == len(rank0["rho"])
    key_bias = np.char.endswith(names.astype(str), "k_proj.bias")
    assert 0 < key_bias.sum() < len(names) / 100
    rho, single_rho = np.asarray(rank0["rho"])[~key_bias], np.asarray(single["rho"])[~key_bias]
    np.testing.assert_allclose(rho, single_rho, rtol=1e-6, atol=0)
    # λ̄ and σ's RMS include the key bias' σ_i (0.3 % of the weights, a few % apart): 1e-3 bounds that.
    for key in ("lambda", "tau", "sigma"):
        assert rank0["learned"][key] == pytest.approx(single["learned"][key], rel=1e-3), key
    assert json.loads((out / "config.json").read_text())["deelbo"] == rank0["learned"]


def test_fsdp_and_deepspeed_are_refused_with_what_works_instead(tmp_path):
    with pytest.raises(ValueError, match=r"FSDP is not supported by DEELBoTrainer.*DDP instead"):
        DEELBoTrainingArguments(output_dir=str(tmp_path / "o"), fsdp=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"DeepSpeed is not supported by DEELBoTrainer.*DDP instead"):
        DEELBoTrainingArguments(output_dir=str(tmp_path / "o"), deepspeed={"train_batch_size": 8}, report_to="none")


def test_models_sharded_with_fully_shard_are_refused(tmp_path):
    import torch.distributed as dist
    from conftest import _free_port, build_model, image_dataset
    from torch.distributed.fsdp import fully_shard

    # A free port, not a fixed one: another test run on the machine may hold any given port.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model, _ = build_model("resnet")
        fully_shard(model)
        args = DEELBoTrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
        with pytest.raises(ValueError, match=r"sharded \(DTensor.*does not support FSDP.*DDP"):
            DEELBoTrainer(model=model, args=args, train_dataset=image_dataset(4))
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "o").exists()


VALIDATION_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_validation_methods.py")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tpgm", "t1t2"])
def test_validation_methods_agree_across_ranks_and_with_one_process(method, tmp_path):
    """Each rank sees half of every validation batch; the radius / strength gradients are averaged,
    so 2 processes × 8 equal 1 process × 16 (training batch and validation batch alike)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    records = {}
    for name, command, batch, ranks in (("two", LAUNCHERS["torchrun"], "8", 2), ("one", [sys.executable], "16", 1)):
        out = tmp_path / name
        result = subprocess.run(
            command + [VALIDATION_SCRIPT, method, str(out), batch],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        records[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    (rank0, rank1), (single,) = records["two"], records["one"]
    assert rank0["world_size"] == 2 and rank0["weights_sha"] == rank1["weights_sha"]
    assert rank0["learned"] == rank1["learned"] and len(set(rank0["learned"])) > 1  # they were learned
    np.testing.assert_allclose(rank0["learned"], single["learned"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rank0["weights"], single["weights"], rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "two" / "config.json").read_text())[method] == rank0["config_entry"]
