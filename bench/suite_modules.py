"""The test suite's time per module, from the log of a run with every duration reported:

    PYTEST_ADDOPTS=--durations=0 make test > suite.log 2>&1
    .venv/bin/python bench/suite_modules.py suite.log

Prints a Markdown table, the slowest modules first: seconds in all (setup, call and teardown of its tests), in
setups (a module-scoped service starts in its first test's setup), in teardowns, and its number of tests.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

LINE = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+tests/(\w+)\.py::")


def per_module(log: str) -> dict[str, collections.Counter]:
    """module -> {setup, call, teardown: seconds; tests: count}"""
    modules: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in log.splitlines():
        if match := LINE.match(line):
            seconds, phase, module = float(match[1]), match[2], match[3]
            modules[module][phase] += seconds
            modules[module]["tests"] += phase == "call"
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    modules = per_module(args.log.read_text())
    total = {name: c["setup"] + c["call"] + c["teardown"] for name, c in modules.items()}
    print(f"all modules: {sum(total.values()):.0f} s\n")
    print("| module | s | share | setup s | teardown s | tests |\n|---|---|---|---|---|---|")
    for name in sorted(total, key=total.get, reverse=True)[:args.top]:
        c = modules[name]
        print(f"| {name} | {total[name]:.0f} | {total[name] / sum(total.values()):.0%} | {c['setup']:.0f} | "
              f"{c['teardown']:.0f} | {c['tests']} |")


if __name__ == "__main__":
    main()
