"""One training process of a distill job: ``python -m compress.distill.worker JOB.json``.

torchrun starts this module once per process (``compress.distill.recipe.run_torchrun``); it also
runs a job alone in a plain subprocess. The job file is a ``compress.jobs.DistillJob`` as JSON.
Process 0 writes the metrics to ``result.json`` beside the job file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress.distill.recipe import run_job
from compress.jobs import DistillJob
from compress.lineage import read_json, write_json


def main(job_file: str) -> None:
    """Run the ``DistillJob`` in ``job_file`` (validated: a field that is wrong is named) as this process."""
    job = DistillJob.model_validate(read_json(Path(job_file)))
    metrics = run_job(job)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        write_json(Path(job_file).with_name("result.json"), metrics)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
