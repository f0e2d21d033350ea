"""`pusa`: one command, its subcommands from the packages that own them. Each subcommand's module is
imported only when it runs, so `pusa client` loads neither torch nor Ray.

    pusa generate --task i2v --image in.png --prompt "..." -o out.mp4    # in this process, no Ray
    pusa checkpoint /models/pusa-random --device cuda                    # random weights at the real sizes
    pusa batch requests.jsonl --output out/                              # a manifest on Ray Data
    pusa client submit --prompt "..." --wait -o out.mp4                  # a running service's HTTP API
"""

from __future__ import annotations

import importlib
import sys

# name: (module whose `main(argv)` runs it, what it does)
COMMANDS = {
    "generate": ("pusa_model.cli", "generate one video in this process (no Ray)"),
    "checkpoint": ("pusa_model.cli", "write a random-weights checkpoint in the layout pusa-v1 loads"),
    "batch": ("pusa_batch.cli", "generate every row of a manifest on Ray"),
    "client": ("pusa_client.cli", "call a running service's HTTP API"),
}
OWN_NAME = {"generate", "checkpoint"}  # commands whose module reads the command's name itself


def usage() -> str:
    lines = ["usage: pusa COMMAND [ARGS...]", "", "Pusa V1 video generation. Commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "pusa COMMAND --help says more."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named by ``argv[0]`` with the rest; 2 and one line for an unknown one."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pusa: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(argv if name in OWN_NAME else rest)
