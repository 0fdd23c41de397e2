"""The benchmark suite's harness: the protocol, a resumable record store with provenance, a
process pool, paired intervals and the docs-section writer.

A question module (`benchmarks.convergence`, `benchmarks.comparison`, `benchmarks.kappa_sweep`,
`benchmarks.lr_check`) gives `jobs()`, a module-level `run_one(job)` that returns records, and
`rows()`/`markdown()` that read records; `command_line` gives it the shared flags;
`run(store, jobs, run_one, workers)` runs what the store lacks, saving after every job, so a killed
pass loses only its unfinished jobs and the same command continues it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

from scipy import stats  # installed with scikit-learn, which the package requires

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL_PATH = os.path.join(ROOT, "benchmarks", "protocol_v2.json")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "v2")


def protocol() -> dict:
    with open(PROTOCOL_PATH) as f:
        return json.load(f)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def code_commit() -> str:
    """The checked-out commit, with "+changes" when tracked files differ from it; "unknown"
    outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """What every record carries besides its backbone's SHA-256: the protocol and the code (read
    once per process, when it first records: a worker keeps the code it imported)."""
    return {"protocol": protocol()["id"], "protocol_sha256": file_sha256(PROTOCOL_PATH), "code_commit": code_commit()}


class RecordStore:
    """A JSON file of records, each identified by `key(record)`; saved atomically after every add.
    Several passes may write the same store at once: a save first merges what the others wrote,
    under a file lock."""

    def __init__(self, path: str, key: Callable[[dict], tuple]):
        self.path, self.key = path, key
        self.records: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                self.records = json.load(f)["records"]
        self.done = {self.key(r) for r in self.records}

    def add(self, records: Iterable[dict]) -> None:
        for record in records:
            if self.key(record) not in self.done:
                self.records.append(record)
                self.done.add(self.key(record))
        self.save()

    def save(self) -> None:
        from filelock import FileLock

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with FileLock(self.path + ".lock"):
            if os.path.exists(self.path):
                with open(self.path) as f:
                    for record in json.load(f)["records"]:
                        if self.key(record) not in self.done:
                            self.records.append(record)
                            self.done.add(self.key(record))
            with open(self.path + ".tmp", "w") as f:
                json.dump({"records": self.records}, f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def command_line(module_doc: str, quick: str, argv=None) -> argparse.Namespace:
    """A question module's flags: --output-dir, --workers, --report (the table only) and --quick
    (a smoke run, `quick` says what it runs)."""
    parser = argparse.ArgumentParser(description=module_doc.split("\n\n")[0])
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="Only print the table from the records.")
    parser.add_argument("--quick", action="store_true", help=quick)
    return parser.parse_args(argv)


def run(
    store: RecordStore,
    jobs: Sequence,
    run_one: Callable,
    job_keys: Callable,
    workers: int,
    describe: Callable[[dict], str] = str,
) -> None:
    """Run the jobs whose records (`job_keys(job)`) are not all in `store`, in the given order,
    on `workers` processes (spawned, one thread each); store each job's records as it ends."""
    todo = [job for job in jobs if not set(job_keys(job)) <= store.done]
    print(f"{len(todo)} of {len(jobs)} jobs to run", flush=True)
    if not todo:
        return
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for records in pool.imap(run_one, todo):
            store.add(records)
            for record in records:
                print(f"[{time.perf_counter() - start:6.0f} s] {describe(record)}", flush=True)


# ---- statistics ---------------------------------------------------------------------------------


def paired_interval(pairs: Sequence[tuple[object, float]]) -> dict:
    """Mean and 95 % interval of paired differences with the replicate as the random factor.

    `pairs`: (replicate, difference) for each (replicate, seed). The seeds' mean per replicate is
    one observation; the interval is mean ± t(0.975, R−1)·sd/√R over the R replicates (NaN bounds
    with one replicate)."""
    by_replicate: dict[object, list[float]] = {}
    for replicate, difference in pairs:
        by_replicate.setdefault(replicate, []).append(difference)
    means = [statistics.mean(v) for v in by_replicate.values()]
    if not means:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "replicates": 0, "pairs": 0}
    mean = statistics.mean(means)
    half = (
        stats.t.ppf(0.975, len(means) - 1) * statistics.stdev(means) / math.sqrt(len(means))
        if len(means) > 1
        else math.nan
    )
    return {"mean": mean, "low": mean - half, "high": mean + half, "replicates": len(means), "pairs": len(pairs)}


def reading(interval: dict, tie: float = 0.0) -> str:
    """ "wins", "loses" or "ties" for a difference whose interval lies above, below or across `tie`."""
    if interval["replicates"] < 2:
        return "n/a"
    if interval["low"] > tie:
        return "wins"
    if interval["high"] < -tie:
        return "loses"
    return "ties"


def format_interval(interval: dict, scale: float = 100.0, digits: int = 1) -> str:
    """ "+1.2 [−0.3, +2.7]" (points by default)."""
    if interval["replicates"] == 0:
        return "–"
    mean = f"{scale * interval['mean']:+.{digits}f}"
    if math.isnan(interval["low"]):
        return mean
    return f"{mean} [{scale * interval['low']:+.{digits}f}, {scale * interval['high']:+.{digits}f}]"
