import pytest
import torch

from locotrain.config import load_config

# The test models are tiny: one thread avoids OpenMP contention, which on a busy 2-core
# machine made them ten times slower.
torch.set_num_threads(1)

# A model small enough that a whole run takes a second or two on 2 CPU cores.
TINY = [
    "model.depth=1", "model.width=32", "model.heads=2", "model.seq_len=16",
    "train.tokens=8192", "train.batch_size=8", "eval.windows=16", "eval.samples=4",
    "sample.chars=40",
    # one worker on an unmodelled device, whatever the quickstart's cluster is
    "algorithm.name=ddp", "cluster.preset=single", "cluster.size=0", "cluster.step_time_s=0",
    # the quickstart's streaming table syncs 2 fragments; the tiny model has 1 block
    "algorithm.streaming.fragments=1", "algorithm.streaming.tau=0", "algorithm.streaming.alpha=0",
]


def tiny_config(*overrides: str):
    return load_config("quickstart", TINY + list(overrides))[1]


@pytest.fixture
def tiny():
    return tiny_config
