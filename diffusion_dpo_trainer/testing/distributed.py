"""Distributed runs on CPU for tests and benchmarks."""

import os

from accelerate.state import PartialState
from accelerate.utils import DistributedType


def allow_fsdp_on_cpu(args) -> None:
    """Let an FSDP launch config (`accelerate launch --config_file examples/accelerate/fsdp.yaml`) shard on CPU.

    accelerate turns FSDP on only for GPU-type process groups; on CPU (gloo) it silently trains plain DDP. Call this
    after creating the training config and before the trainer: it sets up the CPU process group and presents it as a
    GPU one, which the Accelerator's state then turns into FSDP, so the real FSDP2 code path runs. Check that
    parameters really are sharded (DTensor).
    """
    args.device  # noqa: B018 - sets up the process group (gloo with use_cpu)
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        state.distributed_type = DistributedType.MULTI_GPU
