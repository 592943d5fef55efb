"""Start-up time of the command line against bare Python, measured in the same run.

Runs ``python -c pass``, ``soup --help``, ``soup merge --help`` and ``soup --version`` in turn (interleaved,
so drift in the machine's speed hits all of them alike), each a fresh process, and prints the median wall
time of each and its excess over bare Python. Target: under 0.3 s above bare Python.

    python benchmarks/startup.py            # 15 rounds
    python benchmarks/startup.py --rounds 31
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "soup --help": [sys.executable, "-m", "modelsoup", "--help"],
    "soup merge --help": [sys.executable, "-m", "modelsoup", "merge", "--help"],
    "soup --version": [sys.executable, "-m", "modelsoup", "--version"],
}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for cmd in COMMANDS.values():  # warm the page cache and .pyc files
        wall(cmd)
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    bare = statistics.median(times["python -c pass"])
    print(f"{'command':<20} {'median s':>9} {'above bare':>11}   (min .. max, {args.rounds} rounds)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<20} {med:9.3f} {med - bare:+11.3f}   ({min(ts):.3f} .. {max(ts):.3f})")


if __name__ == "__main__":
    main()
