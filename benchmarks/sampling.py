"""How to draw w̃ = m + σε for each training step: `functional_call` versus in-place perturbation.

Both mechanisms are the package's own (`GaussianPosterior.sample_parameters` and
`perturb_in_place`, the two `sampling_mechanism`s) and compute the same gradients
(tests/test_gradients.py checks both against plain autograd). This measures what they cost, side
by side in one run, for a
parameter-dominated setting (a wide MLP, small batch) and an activation-dominated one (a ResNet
on 64×64 images, batch 64), as ratios to a plain step without any sampling:

- step time: median over interleaved repeats (the machine is noisy; ratios, not absolute times)
- peak memory: in a fresh subprocess per (setting, mechanism), the peak RSS during three steps
  (VmHWM, reset after the model is built) minus the RSS before the first step

Run:  python -m benchmarks.sampling            (writes benchmarks/results/sampling.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks._common import reset_peak_rss, status_mb
from benchmarks.harness import ROOT

MECHANISMS = ("plain", "functional_call", "in_place")
SETTINGS = {
    "parameter-dominated (MLP 2048-4096-4096-10, batch 8)": "mlp",
    "activation-dominated (resnet10t, 64x64, batch 64)": "resnet",
}


def build(setting: str):
    torch.manual_seed(0)
    if setting == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Linear(2048, 4096),
            torch.nn.ReLU(),
            torch.nn.Linear(4096, 4096),
            torch.nn.ReLU(),
            torch.nn.Linear(4096, 10),
        )
        x, y = torch.randn(8, 2048), torch.randint(0, 10, (8,))
        head = ["4"]
    else:
        import timm

        model = timm.create_model("resnet10t", num_classes=10)
        x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
        head = ["fc"]
    return model, x, y, head


def make_step(mechanism: str, model, x, y, head):
    from hf_deelbo.core.groups import split_parameters
    from hf_deelbo.methods.deelbo.posterior import GaussianPosterior

    posterior = GaussianPosterior(model, split_parameters(model, head), sigma_init=1e-4)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def functional():
        model.zero_grad(set_to_none=True)
        posterior.rho.grad = None
        logits = torch.func.functional_call(model, posterior.sample_parameters(model), (x,), tie_weights=False)
        F.cross_entropy(logits, y).backward()

    def in_place():
        model.zero_grad(set_to_none=True)
        posterior.rho.grad = None
        draw = posterior.perturb_in_place(model)  # σε added to the weights, ε not kept
        F.cross_entropy(model(x), y).backward()
        draw.finish()  # ε replayed: dL/dρ, the weights back at m

    return {"plain": plain, "functional_call": functional, "in_place": in_place}[mechanism]


def child(setting: str, mechanism: str) -> None:
    torch.set_num_threads(1)
    model, x, y, head = build(setting)
    step = make_step(mechanism, model, x, y, head)
    reset_peak_rss()
    before = status_mb("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"peak_increase_mb": status_mb("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "MECHANISM"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "sampling.json"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    torch.set_num_threads(1)
    results = {}
    for label, setting in SETTINGS.items():
        model, x, y, head = build(setting)
        steps = {m: make_step(m, model, x, y, head) for m in MECHANISMS}
        times = {m: [] for m in MECHANISMS}
        for m in MECHANISMS:
            steps[m]()  # warm-up
        for _ in range(args.repeats):
            for m in MECHANISMS:  # interleaved, so drift in machine load hits all alike
                start = time.perf_counter()
                steps[m]()
                times[m].append(time.perf_counter() - start)
        memory = {}
        for m in MECHANISMS:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.sampling", "--child", setting, m],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            memory[m] = json.loads(out.stdout.strip().splitlines()[-1])["peak_increase_mb"]
        median = {m: statistics.median(times[m]) for m in MECHANISMS}
        results[label] = {
            "num_params": sum(p.numel() for p in model.parameters()),
            "median_step_seconds": median,
            "step_time_ratio_to_plain": {m: median[m] / median["plain"] for m in MECHANISMS},
            "peak_memory_increase_mb": memory,
            "peak_memory_ratio_to_plain": {m: memory[m] / memory["plain"] for m in MECHANISMS},
        }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"torch": torch.__version__, "threads": 1, "repeats": args.repeats, "results": results}, f, indent=2)
    for label, r in results.items():
        print(label)
        for m in MECHANISMS:
            print(
                f"  {m:<16} time x{r['step_time_ratio_to_plain'][m]:.3f}   peak memory x{r['peak_memory_ratio_to_plain'][m]:.3f}"
                f"  (+{r['peak_memory_increase_mb'][m]:.0f} MB)"
            )


if __name__ == "__main__":
    main()
