"""FSDP2 (torch's fully_shard) at the torch level: 2 CPU processes on gloo, the in-place draw on
sharded parameters against the same steps under DDP (tests/scripts/fsdp_train.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_train.py")
TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2"]


def _launch(mode, tmp_path, grouping="backbone"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        TORCHRUN + [SCRIPT, mode, str(tmp_path / mode), "cpu", grouping],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / mode / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("grouping", ["backbone", "layer"])
def test_fully_sharded_training_equals_ddp(grouping, tmp_path):
    """Each rank perturbs its own shard with the numbers a single process would draw; the squared
    distances and dL/dσ are summed over shards; μ is stored sharded. Five SGD steps on m and ρ
    agree with DDP up to the order of float sums (weights 1e-6, λ, τ, σ 1e-6 relative); with "layer"
    grouping every λ_l too (each tensor's distance summed over its shards)."""
    fsdp, ddp = _launch("fsdp", tmp_path, grouping), _launch("ddp", tmp_path, grouping)
    assert fsdp[0]["prior_mean_sharded"]
    for rank in range(2):
        np.testing.assert_allclose(fsdp[rank]["weights"], ddp[rank]["weights"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(fsdp[rank]["losses"], ddp[rank]["losses"], rtol=1e-6)
        np.testing.assert_allclose(fsdp[rank]["lambdas"], ddp[rank]["lambdas"], rtol=1e-6)
        for key in ("lambda", "tau", "sigma"):
            assert fsdp[rank][key] == pytest.approx(ddp[rank][key], rel=1e-6), key
        np.testing.assert_allclose(
            fsdp[rank]["backbone_prior_variances"], ddp[rank]["backbone_prior_variances"], rtol=1e-6
        )
    assert len(fsdp[0]["backbone_prior_variances"]) == (4 if grouping == "layer" else 1)
    # the ranks agree with each other, and training moved σ and the weights
    assert fsdp[0]["sigma"] == fsdp[1]["sigma"] and fsdp[0]["lambda"] == fsdp[1]["lambda"]
    assert fsdp[0]["sigma"] > 0.051
    assert fsdp[0]["lambdas"][-1] > 1.1 * fsdp[0]["lambdas"][0]
