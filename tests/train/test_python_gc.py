"""The training loop's garbage-collection policy (megatron_ds.train.PythonGC)."""

import gc

from megatron_ds.train import PythonGC


def young_collections() -> int:
    return gc.get_stats()[1]["collections"]


def test_collects_between_steps_every_interval_and_restores_the_collector():
    assert gc.isenabled()
    with PythonGC(2) as python_gc:
        assert not gc.isenabled(), "no collection may start inside a step"
        before = young_collections()
        python_gc.step(1)
        assert young_collections() == before
        python_gc.step(2)
        assert young_collections() == before + 1
    assert gc.isenabled()


def test_a_checkpoint_save_collects_every_generation():
    with PythonGC(50) as python_gc:
        before = gc.get_stats()[2]["collections"]
        python_gc.saved()
        assert gc.get_stats()[2]["collections"] == before + 1


def test_interval_zero_leaves_the_collector_automatic():
    with PythonGC(0) as python_gc:
        assert gc.isenabled()
        before = young_collections(), gc.get_stats()[2]["collections"]
        python_gc.step(50)
        python_gc.saved()
        assert (young_collections(), gc.get_stats()[2]["collections"]) == before
    assert gc.isenabled()


def test_collector_off_before_stays_off():
    gc.disable()
    try:
        with PythonGC(3):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
