"""Start-up time of the ``tl-reward`` command: ``--help``, ``--version`` and argument errors.

Each case runs as a fresh process (``python -m tl_reward.cli ...``), as a user's shell would, and
is compared with a bare ``python -c pass`` timed in the same run, interleaved round by round so
the machine's load hits every case alike; the import of torch is timed for scale.

    python benchmarks/bench_cli.py [--rounds 15]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "tl_reward.cli"]
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "tl-reward --help": [*CLI, "--help"],
    "tl-reward --version": [*CLI, "--version"],
    "tl-reward score --help": [*CLI, "score", "--help"],
    "tl-reward score (missing --pairs: usage error)": [*CLI, "score", "longtail"],
    "tl-reward score longtail --pairs missing.jsonl": [*CLI, "score", "longtail", "--pairs",
                                                       "missing.jsonl"],
    "tl-reward score nomodel --pairs missing.jsonl": [*CLI, "score", "nomodel", "--pairs",
                                                      "missing.jsonl"],
    'python -c "import torch" (for scale)': [sys.executable, "-c", "import torch"],
}
EXPECTED_RC = {"tl-reward score (missing --pairs: usage error)": 2}


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name, cmd in CASES.items():  # warm the file cache, check each case does what it says
        rc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True).returncode
        want = EXPECTED_RC.get(name, 1 if "missing.jsonl" in name else 0)
        if rc != want:
            raise SystemExit(f"{name}: exit status {rc}, expected {want}")
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, cmd in CASES.items():
            times[name].append(_time(cmd, env))
    bare = statistics.median(times["python -c pass"])
    load = os.getloadavg()[0]
    lines = [
        "## CLI start-up (issue 23)",
        "",
        "Wall time of a fresh process, median of "
        f"{args.rounds} rounds (cases interleaved in each round), 1-minute load average "
        f"{load:.1f} at the end; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}. Command: "
        "`PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_cli.py`.",
        "",
        "| command | median s | min s | / bare python |",
        "|---|---:|---:|---:|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| `{name}` | {med:.3f} | {min(ts):.3f} | {med / bare:.1f}x |")
    lines += [
        "",
        "torch, transformers and TransformerLens are imported only after the arguments parse "
        "and the model and pairs file are found (`tests/test_cli.py` checks that parsing imports "
        "no torch).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        write_section("bench-cli", body)


if __name__ == "__main__":
    main()
