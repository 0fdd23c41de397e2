"""What holds DE ELBO back where the drop-in matrix misses: σ's start, the prior, or the draw's noise?

One cell of each kind of miss, on the calibration's held-out data (N = 100, seed 10, 200 steps,
`dropin.py`'s arguments), DEELBoTrainer at its defaults but for one change per row:

- ResNet, AdamW 5e-5: `sigma_init` 1e-4 (the default) / 1e-3 / 1e-2; κ = 37,330 and 373,300,
  about 10× and 100× the DE ELBO's D/N = 3,732 (D = 373,173): a weaker prior and, through σ's
  optimum, a smaller draw; and "noise only": σ fixed at 6.7e-3 (the σ the default run
  ends with; `sigma_learning_rate` 1e-12) and no prior (κ = 1e12), i.e. plain fine-tuning at the
  draw w̃ = m + σε.
- ViT, SGD-Nesterov 0.01: the three `sigma_init` values.

    python benchmarks/dropin_diagnosis.py    # ≈ 5 min on 2 cores: benchmarks/results/dropin-diagnosis.json
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dropin  # noqa: E402
import transfer  # noqa: E402

SIGMA_INIT = {f"sigma_init={s}": {"sigma_init": s} for s in (1e-4, 1e-3, 1e-2)}
CELLS = [
    ("timm-resnet", "AdamW 5e-5 linear", {
        **SIGMA_INIT, "kappa=10D/N": {"kappa": 37330.0}, "kappa=100D/N": {"kappa": 373300.0},
        "noise only": {"sigma_init": 6.7e-3, "sigma_learning_rate": 1e-12, "kappa": 1e12},
    }),
    ("vit", "SGD-Nesterov 0.01 cosine", SIGMA_INIT),
]


def main() -> None:
    output_dir = os.path.join(dropin.ROOT, "benchmarks", "results")
    start, records = time.perf_counter(), []
    for backbone, optimizer, candidates in CELLS:
        path = transfer.pretrained_path(backbone, os.path.join(output_dir, "pretrained"))
        work_dir = os.path.join(output_dir, "runs", f"diagnosis-{backbone}")
        records.append(dropin.run_cell((backbone, 100, 10, optimizer, 200, path, work_dir, None), candidates))
        with open(os.path.join(output_dir, "dropin-diagnosis.json"), "w") as f:
            json.dump({"settings": {"n": 100, "seed": 10, "steps": 200, "cells": CELLS},
                       "seconds": time.perf_counter() - start, "records": records}, f, indent=1)
    for record in records:
        plain = record[dropin.PLAIN]["accuracy"]
        for name, result in record.items():
            if name.startswith(dropin.DEELBO):
                print(f"{record['backbone']} {record['optimizer']} {name}: {100 * (result['accuracy'] - plain):+.1f} "
                      f"points, σ {result['sigma']:.2g}, α_eff {result['alpha_eff']:.2g}")


if __name__ == "__main__":
    main()
