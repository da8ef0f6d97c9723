"""Compiled step time of each optimizer: ours vs mlx.optimizers vs torch, in one run.

The measuring lives in ``mlx_optim.cli.bench`` (also ``mlx-optim bench``); this script keeps
the old entry point and options.

    python benchmarks/step_time.py [--rounds 7] [--steps 20] [--only Adam SGD] [--json out.json]
"""

import sys

from mlx_optim.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
