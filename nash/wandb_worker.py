"""W&B calls in a process of their own.

wandb's service can wait forever on a server that does not answer (its exit hook joins a busy
service), so the round asks W&B only through this worker, with a deadline; past it the worker is
killed, and wandb's service, left without its client, ends. The worker leaves with os._exit once
its answer is out or its run is finished, skipping that hook.

    python -m nash.wandb_worker probe       exit 0 if the server (WANDB_BASE_URL) takes the API key
    python -m nash.wandb_worker log SPEC    wandb.init(**SPEC["init"]), each row at its step, finish
                                            (project, group, tags... come from WANDB_* in the environment)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nash.lifeline import die_with_parent

ERROR_TAG = "nash-wandb-error:"


def main(argv: list[str]) -> int:
    die_with_parent()
    import wandb

    try:
        if argv[0] == "probe":
            wandb.Api(timeout=10).viewer  # WANDB_BASE_URL and the key come from the environment
            return 0
        spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        run = wandb.init(**spec["init"], settings=wandb.Settings(init_timeout=30, silent=True, console="off"))
        for step, row in spec["rows"]:
            run.log(row, step=step)
        run.finish()
        return 0
    except Exception as e:  # wandb's messages name the server, never the key
        print(f"{ERROR_TAG} {type(e).__name__}: {str(e)[:300]}", flush=True)
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
