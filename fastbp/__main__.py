"""``python -m fastbp COMMAND``: the command-line tools. Each command lives in its own module."""
from __future__ import annotations

import importlib
import sys

# command -> (module with a main(argv) function, one-line description)
COMMANDS = {
    "bench": ("fastbp.bench", "time the standard workloads on every usable device (CPU vs GPU)"),
    "info": ("fastbp.info", "versions, threading, cache and CUDA availability"),
    "precompile": ("fastbp.warm_cache", "compile the CPU kernels of the common configurations into the disk cache"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fastbp COMMAND [options]\n\ncommands:")
        for name, (_, description) in COMMANDS.items():
            print(f"  {name:<10} {description}")
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"fastbp: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
