"""Run by tests/test_launch.py under `accelerate launch` (2 CPU processes): one all_reduce over gloo.

Each rank writes what it saw to OUT_DIR/rank<i>.json. Not a test module (no test_ prefix).
"""

import json
import sys
from pathlib import Path


def main(out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator, PartialState

    Accelerator()  # reads ACCELERATE_USE_CPU (launch_argv sets it for a CPU config) and initialises gloo
    state = PartialState()  # the same shared state
    total = torch.tensor([float(state.process_index)])
    dist.all_reduce(total)  # sum of the ranks: 0 + 1
    doc = {"rank": state.process_index, "world_size": state.num_processes, "sum": total.item(),
           "backend": dist.get_backend(), "distributed_type": str(state.distributed_type)}
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(doc))
    # tear the group down before exiting: gloo's threads alive at interpreter exit can abort the process
    # ("terminate called without an active exception", SIGABRT)
    dist.barrier()
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
