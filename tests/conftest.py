import os
import sys

import pytest
import torch

# Tests import the dense reference and helper scripts that live beside them.
sys.path.insert(0, os.path.dirname(__file__))
# ... and the offline tasks of the repository (recipes/offline_tasks: not part of the installed package).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a 2-core machine: one intra-op thread is faster and keeps timings steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (world size 1), torn down afterwards."""
    import torch.distributed as dist

    from helpers import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
