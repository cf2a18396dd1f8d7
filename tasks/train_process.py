"""One rank of a data-parallel ``train-loop``: the module ``torch.distributed.run`` starts N times.

``python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.train_process <job.json>``, started
by ``tasks.training.run_engine_under_torchrun``. The job file holds the train spec, the loop index and the
checkpoint to resume from. Each rank joins the process group (gloo when the run's device is the CPU, NCCL
on CUDA, one GPU per rank), reads the same inputs, and runs the engine for that one loop
(``vecaf.train.ddp``: equal shares of every batch, gradients averaged); rank 0 writes the checkpoint and,
after the last loop, the model and ``result.json`` into the run's cached folder, which the task then
uploads. Every rank leaves the process group and exits after the loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the rank; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m torch.distributed.run ... -m tasks.train_process <job.json>", file=sys.stderr)
        return 2
    from tasks.training import run_engine, spec_from_json
    from vecaf.settings import resolve_device
    from vecaf.train import ddp

    job = json.loads(Path(args[0]).read_text())
    spec = spec_from_json(job["spec"])
    backend = "gloo" if resolve_device(str(spec.models.device)) == "cpu" else "nccl"
    ddp.init_distributed(backend=backend)
    try:
        run_engine(spec, int(job["loop"]), job["resume"] or False)
    finally:
        ddp.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
