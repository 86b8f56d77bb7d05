"""All-reduce bus bandwidth between the GPUs of this machine (NCCL), to feed the simulator.

    python benchmarks/nccl_bandwidth.py            # spawns one process per GPU
"""

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: int, sizes: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    for size in sizes:
        x = torch.ones(size // 4, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        reps = 10
        for _ in range(reps):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / reps
        busbw = 2 * (world - 1) / world * size / seconds  # bytes/s each rank moves
        if rank == 0:
            print(f"all-reduce {size / 1e6:8.1f} MB: {seconds * 1e3:8.3f} ms, "
                  f"bus bandwidth {busbw * 8 / 1e9:8.1f} Gbit/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    world = torch.cuda.device_count()
    sizes = [int(s) for s in sys.argv[1:]] or [1 << 20, 16 << 20, 43 << 20, 256 << 20]
    mp.spawn(worker, args=(world, 29377, sizes), nprocs=world)
