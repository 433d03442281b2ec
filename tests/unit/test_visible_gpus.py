"""Which GPUs a job's ranks see (hfhpc.launch.node.visible_gpus)."""

import pytest

from hfhpc.launch.node import visible_gpus


def test_outside_slurm_a_job_sees_the_gpus_it_asked_for():
    assert visible_gpus(None, 1) == "0"
    assert visible_gpus(None, 4) == "0,1,2,3"


def test_a_job_that_sees_more_gpus_than_it_asked_for_gets_the_first_of_them():
    # One GPU asked, two visible: Trainer would wrap the model in nn.DataParallel (TRL refuses it).
    assert visible_gpus("0,1", 1) == "0"
    assert visible_gpus("GPU-1a2b, GPU-3c4d", 1) == "GPU-1a2b"


def test_the_allocation_slurm_gave_is_kept():
    assert visible_gpus("2,3", 2) == "2,3"


def test_fewer_gpus_than_asked_is_refused_before_any_rank_starts():
    with pytest.raises(SystemExit, match=r"asks for 2 GPUs per node and this node shows 1 \(CUDA_VISIBLE_DEVICES=5\)"):
        visible_gpus("5", 2)
    with pytest.raises(SystemExit, match="shows 0"):
        visible_gpus("", 1)  # CUDA_VISIBLE_DEVICES set empty: no GPU
