"""What `torchrun` runs when a training asset launches a phase through Dagster Pipes.

Every rank runs `megacontext train-phase` (the library never imports Dagster);
rank 0 also opens the Pipes channel and reports into the asset's run log, so the
other ranks stay silent and nothing is reported twice.
"""

from __future__ import annotations

import os
import sys

from dagster_pipes import open_dagster_pipes

from megacontext.cli import main as cli


def main(argv: list[str]) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        return cli(["train-phase", *argv])
    with open_dagster_pipes() as pipes:
        code = cli(["train-phase", *argv])
        world = os.environ.get("WORLD_SIZE", "1")
        pipes.log.info(f"train-phase {' '.join(argv[:2])} exited {code} on {world} process(es)")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
