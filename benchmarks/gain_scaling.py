"""Time and peak memory of `gain_matrix` against the literal K^4 formula, one fresh process per measurement.

    .venv/bin/python benchmarks/gain_scaling.py                       # K = 10, 100, 1000, 8142; K^4 for K <= 100
    .venv/bin/python benchmarks/gain_scaling.py --ks 10 100 --json out.json

Prints a markdown table (the one in docs/benchmarks.md). Peak memory is the growth of the process's
maximum resident set during the call, measured in a subprocess that holds only the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import current_rss_kib  # noqa: E402


def make_inputs(num_classes: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """Random prototypes and head, and a diagonal-heavy normalised confusion matrix."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, dim, generator=gen, dtype=dtype)
    weight = torch.randn(num_classes, dim, generator=gen, dtype=dtype) / dim**0.5
    bias = torch.zeros(num_classes, dtype=dtype)
    scores = torch.randn(num_classes, num_classes, generator=gen, dtype=dtype)
    scores.diagonal().add_(3.0)
    confusion = torch.softmax(scores, dim=1) / num_classes
    return confusion, protos, weight, bias


def measure(num_classes: int, dim: int, method: str, repeats: int, dtype_name: str) -> dict:
    """One measurement in this process: median wall time and peak RSS growth of the call."""
    from selmix_hf.gains import gain_matrix, gain_matrix_reference
    from selmix_hf.objectives import get_objective

    dtype = getattr(torch, dtype_name)
    inputs = make_inputs(num_classes, dim, dtype)
    objective = get_objective("min_recall", num_classes)
    objective.update(inputs[0].double())
    fn = gain_matrix if method == "factorised" else gain_matrix_reference
    baseline = current_rss_kib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(objective, *inputs)
        times.append(time.perf_counter() - start)
        del result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "K": num_classes,
        "d": dim,
        "method": method,
        "dtype": dtype_name,
        "seconds": statistics.median(times),
        "repeats": repeats,
        "peak_mib": max(0, peak - baseline) / 1024,
    }


def agreement(num_classes: int, dim: int) -> float:
    """Max relative difference between the factorised and the K^4 gains, in float64."""
    from selmix_hf.gains import gain_matrix, gain_matrix_reference
    from selmix_hf.objectives import get_objective

    inputs = make_inputs(num_classes, dim, torch.float64)
    objective = get_objective("min_recall", num_classes)
    objective.update(inputs[0])
    fast, slow = gain_matrix(objective, *inputs), gain_matrix_reference(objective, *inputs)
    return float((fast - slow).abs().max() / slow.abs().max())


def in_subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000, 8142])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--reference-max-k", type=int, default=100)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", nargs=4, metavar=("K", "DIM", "METHOD", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        k, dim, method, repeats = args.child
        if method == "agreement":
            print(json.dumps({"relative_difference": agreement(int(k), int(dim))}))
        else:
            print(json.dumps(measure(int(k), int(dim), method, int(repeats), args.dtype)))
        return

    rows = []
    for k in args.ks:
        repeats = 5 if k <= 1000 else 1
        row = {"K": k, "fast": in_subprocess(str(k), str(args.dim), "factorised", str(repeats), "--dtype", args.dtype)}
        if k <= args.reference_max_k:
            row["k4"] = in_subprocess(str(k), str(args.dim), "k4", str(min(repeats, 3)), "--dtype", args.dtype)
            row["agreement"] = in_subprocess(str(k), str(args.dim), "agreement", "1")["relative_difference"]
        rows.append(row)
        print(f"done K={k}", file=sys.stderr, flush=True)

    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, d = {args.dim}, {args.dtype}, objective min_recall\n"
    )
    print(
        "| K | gain_matrix time | gain_matrix peak memory | K^4 formula time | K^4 peak memory | speed-up "
        "| max rel. diff (float64) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        fast = row["fast"]
        cells = [str(row["K"]), f"{fast['seconds']:.4f} s", f"{fast['peak_mib']:.0f} MiB"]
        if "k4" in row:
            k4 = row["k4"]
            cells += [
                f"{k4['seconds']:.4f} s",
                f"{k4['peak_mib']:.0f} MiB",
                f"{k4['seconds'] / fast['seconds']:.0f}x",
                f"{row['agreement']:.1e}",
            ]
        else:
            cells += ["not run (K^4)"] * 2 + ["", ""]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
