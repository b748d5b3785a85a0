"""Training loops as users get them: a real run's train_seconds against the seed's loop, same session.

Alternates, `--reps` times, a real `python -m flows run --json` (fresh store, so the train stage is
computed) and a fresh subprocess timing the seed's own loop (or a plain autograd loop of the same
model), and prints medians of the ratios. Run from the repository root against a running server:

    PREFECT_API_URL=http://127.0.0.1:4391/api PREFECT_HOME=/tmp/loops-home \
        python benchmarks/loops_probe.py --reps 5 analytic finite-difference autograd optimizer default poly:3 mlp:13
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STRATEGIES = ("analytic", "finite-difference", "autograd", "optimizer")
MODEL_LR = {"poly:3": 0.5, "mlp:13": 1e-3}

# one cold run of a reference loop in a fresh process, as the real run's train stage is its process's first training
REFERENCE = r"""
import sys, time
sys.path.insert(0, "benchmarks")
import io
from contextlib import redirect_stdout
import pandas as pd, torch
from seed_loops import plain_autograd, run_seed_loop
table = pd.read_csv("data/readings.csv")
t_u = torch.tensor(table["reading"].to_numpy(), dtype=torch.float32)
t_c = torch.tensor(table["celsius"].to_numpy(), dtype=torch.float32)
what = sys.argv[1]
if what.startswith(("poly", "mlp")):
    from tasks.models import make_model
    x = 0.1 * t_u
    model = make_model(what).fit(x.double().numpy())
    f = model.features(x.double()).float()
    run = lambda: plain_autograd(what, f, t_c, float(sys.argv[2]))
else:
    run = lambda: run_seed_loop(what, 0.1 * t_u, t_c)
started = time.perf_counter()
with redirect_stdout(io.StringIO()):
    run()
print(time.perf_counter() - started)
"""


def reference_seconds(what: str, lr: float = 0.0) -> float:
    out = subprocess.run([PYTHON, "-c", REFERENCE, what, str(lr)], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def run_args(case: str, strategy: str) -> list[str]:
    if case == "default":
        return []
    args = ["--normalize", "scale", "--epochs", "5000", "--strategy", strategy]
    if case in MODEL_LR:
        args += ["--model", case, "--lr", str(MODEL_LR[case]), "--delta", "1e-2"]
    else:
        args += ["--lr", "1e-2"]
    return args + (["--optimizer", "sgd"] if strategy == "optimizer" else [])


def real_seconds(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as store:
        out = subprocess.run([PYTHON, "-m", "flows", "run", "--json", "--store", store, *args], cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout)["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="+", help="a strategy, 'default', or a model spec (poly:3, mlp:13)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--strategies", default="analytic,finite-difference,autograd,optimizer",
                        help="strategies for a model spec case")
    opts = parser.parse_args()
    rows = []
    for case in opts.cases:
        pairs = [(case, s) for s in opts.strategies.split(",")] if case in MODEL_LR else [(case, case)]
        for case_, strategy in pairs:
            ours, refs, ratios = [], [], []
            for _ in range(opts.reps):
                mine = real_seconds(run_args(case_, strategy))
                if case_ in MODEL_LR:
                    ref = reference_seconds(case_, MODEL_LR[case_])
                else:
                    ref = reference_seconds("analytic" if case_ == "default" else strategy)
                ours.append(mine), refs.append(ref), ratios.append(mine / ref)
                print(json.dumps({"case": case_, "strategy": strategy, "train_seconds": mine, "reference": ref}),
                      file=sys.stderr, flush=True)
            label = f"{case_} {strategy}" if case_ in MODEL_LR else case_
            rows.append((label, statistics.median(ours), statistics.median(refs), statistics.median(ratios)))
    print(f"{'case':32} {'train_s':>9} {'ref_s':>9} {'ratio':>8}")
    for label, mine, ref, ratio in rows:
        print(f"{label:32} {mine:9.4f} {ref:9.4f} {ratio:8.4f}")


if __name__ == "__main__":
    main()
