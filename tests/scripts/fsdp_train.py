"""DE ELBO steps on a small MLP, sharded with torch's fully_shard (FSDP2) or replicated with DDP;
launched with 2 processes on gloo by tests/test_fsdp.py.

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_train.py fsdp OUTPUT_DIR
    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_train.py ddp OUTPUT_DIR
    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_train.py fsdp OUTPUT_DIR cuda   # on 2 GPUs (nccl)
    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_train.py fsdp OUTPUT_DIR cpu layer  # one λ_l per tensor

(On CUDA the draw is a different, equally valid ε than one torch.randn(D): FSDP and DDP still
draw the same one, so the two runs must agree as on CPU.)

Each step: the in-place draw w̃ = m + σε (each FSDP rank perturbs its own shard), λ*, τ* from the
squared distances (summed over shards), loss = mean CE + KL/(κN) on the rank's half of the batch,
backward, `draw.finish()` (dL/dρ summed over shards, weights restored), one SGD step on m and ρ.
Each rank writes rank{R}.json with the full weights, λ, τ, σ and its losses.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hf_deelbo.core.groups import split_parameters
from hf_deelbo.methods.deelbo.posterior import GaussianPosterior

STEPS, GLOBAL_BATCH, NUM_TRAIN = 5, 8, 64


def build():
    torch.manual_seed(0)
    # Odd sizes: the shards of every tensor are uneven (4 + 3 rows, 3 + 2, ...).
    body = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh())
    return torch.nn.Sequential(body, torch.nn.Linear(5, 3))


def main():
    mode, output_dir = sys.argv[1], sys.argv[2]
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    model = build().to(device)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0][0], model[0][2], model[1]):
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    grouping = sys.argv[4] if len(sys.argv) > 4 else "backbone"
    posterior = GaussianPosterior(
        model, split_parameters(model, ["1"]), sigma_init=0.05, prior_variance_grouping=grouping
    )
    kappa = posterior.num_params / NUM_TRAIN
    optimizer = torch.optim.SGD([*model.parameters(), posterior.rho], lr=0.2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 6, generator=generator).to(device)
    y = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=generator).to(device)
    share = GLOBAL_BATCH // world
    torch.manual_seed(2)  # the noise stream: the same on every rank (cuda too: manual_seed seeds every device)
    losses, lambdas = [], []
    for step in range(STEPS):
        draw = posterior.perturb_in_place(model)
        distances = draw.squared_distances
        lam, tau = posterior.optimal_prior_variances(distances)
        kl = posterior.kl(lam, tau, distances)
        xs, ys = x[step, rank * share : (rank + 1) * share], y[step, rank * share : (rank + 1) * share]
        loss = F.cross_entropy(wrapped(xs), ys) + kl / (kappa * NUM_TRAIN)
        loss.backward()
        draw.finish()
        if mode == "ddp":  # ρ lives outside the DDP module (as DEELBoTrainer.training_step does)
            dist.all_reduce(posterior.rho.grad)
            posterior.rho.grad /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        posterior.clamp_sigma()
        losses.append(loss.item())
        lambdas.append(float(posterior.mean_backbone_prior_variance(lam)))
    lam, tau = posterior.optimal_prior_variances()
    full = [p.full_tensor() if type(p).__name__ == "DTensor" else p for p in model.parameters()]
    mu = posterior.anchor.prior_mean[0]
    record = {
        "weights": torch.cat([p.detach().flatten() for p in full]).tolist(),
        "lambda": float(posterior.mean_backbone_prior_variance(lam)),
        "tau": float(tau),
        "backbone_prior_variances": lam.tolist() if lam.ndim else [float(lam)],
        "sigma": posterior.sigma().item(),
        "losses": losses,
        "lambdas": lambdas,
        "prior_mean_sharded": type(mu).__name__ == "DTensor" and mu.to_local().numel() < mu.numel(),
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
