"""The generated sections of docs/benchmarks.md (the main table: means and paired intervals; the
cost table) and of docs/benchmarks/protocol-v2.md (the steps of each cell, every unit's numbers,
the κ and learning-rate checks), from protocol v2's committed records.

    python -m benchmarks.report             # rewrites the sections
    python -m benchmarks.report --check     # exits 1 if a committed page differs from the records

The page's text around the sections is written by hand; every number in the sections comes from
benchmarks/results/v2/*.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from benchmarks import comparison, convergence, harness, kappa_sweep, lr_check

DOCS = os.path.join(harness.ROOT, "docs", "benchmarks.md")
APPENDIX = os.path.join(harness.ROOT, "docs", "benchmarks", "protocol-v2.md")
# Each generated section and the page it is on: the front page, or protocol v2's appendix.
PAGES = {
    "v2-main": DOCS,
    "v2-cost": DOCS,
    "v2-steps": APPENDIX,
    "v2-units": APPENDIX,
    "v2-kappa": APPENDIX,
    "v2-lr": APPENDIX,
}
SECTIONS = {name: (f"<!-- {name}:start -->", f"<!-- {name}:end -->") for name in PAGES}
# The rows of the main table, as comparison.rows names them, and how the page names them.
MAIN_ROWS = {
    comparison.DEELBO_MEAN: "DE ELBO",
    comparison.DEELBO_BMA: "DE ELBO, 16-draw average",
    comparison.DEELBO_BN: "DE ELBO, BatchNorm recomputed",
    comparison.HALVING: "DE ELBO, halving",
    comparison.ORACLE: "best fixed α (oracle, α = 0 included)",
    comparison.GRID: "L2-SP grid",
    comparison.BO: "L2-SP + BO-36",
    comparison.LAPLACE: "Laplace LA-LML",
    comparison.IVON: "IVON (hess_init by training loss)",
}


def main_table(records: list[dict]) -> str:
    """Per cell: plain fine-tuning's mean accuracy and NLL, and each other row's paired difference
    (points of accuracy; NLL in nats) with its 95 % interval over the replicates."""
    accuracy = {(e["task"], e["backbone"], e["n"], e["row"]): e for e in comparison.rows(records, "accuracy")}
    nll = {(e["task"], e["backbone"], e["n"], e["row"]): e for e in comparison.rows(records, "nll")}
    lines = [
        "| task | backbone | N | units | plain: accuracy, NLL | row | accuracy − plain (points) | NLL − plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in comparison.all_cells():
        plain = accuracy.get((*cell, comparison.PLAIN))
        if plain is None:
            continue
        head = (
            f"| {cell[0]} | {cell[1]} | {cell[2]} | {plain['units']} ({plain['replicates']} replicates) "
            f"| {plain['mean']:.3f}, {nll[(*cell, comparison.PLAIN)]['mean']:.3f} "
        )
        for row, name in MAIN_ROWS.items():
            entry = accuracy.get((*cell, row))
            if entry is None or "vs_plain" not in entry:
                continue
            lines.append(
                f"{head}| {name} | {harness.format_interval(entry['vs_plain'])} "
                f"| {harness.format_interval(nll[(*cell, row)]['vs_plain'], 1.0, 3)} |"
            )
            head = "| | | | | "
    return "\n".join(lines)


def cost_table(records: list[dict]) -> str:
    """Mean wall seconds of each procedure per cell (one thread per process; the pass shares two
    cores), and its ratio to DE ELBO's."""
    by = {}
    for r in records:
        key = (r["task"], r["backbone"], r["n"], r["method"])
        by.setdefault(key, []).append(r["seconds"])
    methods = [comparison.PLAIN, comparison.DEELBO, comparison.HALVING, comparison.GRID, comparison.BO]
    lines = [
        "| task | backbone | N | steps | " + " | ".join(f"{m} (s)" for m in methods) + " | grid / DE ELBO |",
        "|---|---|---|---|" + "---|" * len(methods) + "---|",
    ]
    steps = {(r["task"], r["backbone"], r["n"]): r["steps"] for r in records}
    for cell in comparison.all_cells():
        means = {m: statistics.mean(by[(*cell, m)]) for m in methods if (*cell, m) in by}
        if not means:
            continue
        ratio = (
            f"{means[comparison.GRID] / means[comparison.DEELBO]:.1f}×"
            if {comparison.GRID, comparison.DEELBO} <= set(means)
            else "–"
        )
        lines.append(
            f"| {cell[0]} | {cell[1]} | {cell[2]} | {steps[cell]} | "
            + " | ".join(f"{means[m]:.0f}" if m in means else "–" for m in methods)
            + f" | {ratio} |"
        )
    return "\n".join(lines)


def units_table(records: list[dict]) -> str:
    """Every unit's test accuracy (and NLL) per procedure: the numbers behind the intervals."""
    values = comparison.predictions(records)
    rows = [row for row in comparison.ROWS if row != comparison.ORACLE]
    lines = [
        "| task | backbone | N | replicate | seed | " + " | ".join(rows) + " |",
        "|---|---|---|---|---|" + "---|" * len(rows),
    ]
    units = sorted({key[1:] for key in values}, key=lambda u: (comparison.all_cells().index(u[:3]), u[3:]))
    for unit in units:
        cells = [
            f"{values[(row, *unit)]['accuracy']:.3f} ({values[(row, *unit)]['nll']:.2f})"
            if (row, *unit) in values
            else "–"
            for row in rows
        ]
        lines.append(f"| {unit[0]} | {unit[1]} | {unit[2]} | {unit[3]} | {unit[4]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_table(records: list[dict]) -> str:
    rule = harness.protocol()["steps"]
    return convergence.markdown(convergence.rows(records, rule["candidates"], rule["longest"]))


def sections(results_dir: str = harness.RESULTS) -> dict[str, str]:
    compared = harness.RecordStore(os.path.join(results_dir, "comparison.json"), comparison.record_key).records
    calibrated = harness.RecordStore(convergence.results_path(results_dir), convergence.record_key).records
    kappas = harness.RecordStore(kappa_sweep.results_path(results_dir), kappa_sweep.record_key).records
    learning_rates = harness.RecordStore(lr_check.results_path(results_dir), lr_check.record_key).records
    bodies = {
        "v2-main": main_table(compared),
        "v2-cost": cost_table(compared),
        "v2-steps": steps_table(calibrated),
        "v2-units": units_table(compared),
        "v2-kappa": kappa_sweep.markdown(kappa_sweep.rows(kappas)),
        "v2-lr": lr_check.markdown(lr_check.rows(learning_rates)),
    }
    return {name: f"{SECTIONS[name][0]}\n{body}\n{SECTIONS[name][1]}" for name, body in bodies.items()}


def render(text: str, generated: dict[str, str]) -> str:
    """`text` with each generated section in place of the one between its markers."""
    for name, section in generated.items():
        start, end = SECTIONS[name]
        if start not in text:
            raise ValueError(f"no {start} marker on {PAGES[name]}: add the section's markers where it goes")
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    return text


def rendered_pages(results_dir: str = harness.RESULTS) -> dict[str, tuple[str, str]]:
    """Each page: (its text now, its text with the sections the records give)."""
    generated = sections(results_dir)
    pages = {}
    for page in sorted(set(PAGES.values())):
        with open(page) as f:
            text = f.read()
        pages[page] = (text, render(text, {n: body for n, body in generated.items() if PAGES[n] == page}))
    return pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=harness.RESULTS)
    parser.add_argument("--check", action="store_true", help="Exit 1 if a page differs from what the records give.")
    args = parser.parse_args(argv)
    for page, (text, rendered) in rendered_pages(args.results_dir).items():
        if args.check and rendered != text:
            print(
                f"{page} differs from what benchmarks/results/v2 gives: run python -m benchmarks.report",
                file=sys.stderr,
            )
            return 1
        if not args.check:
            with open(page, "w") as f:
                f.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
