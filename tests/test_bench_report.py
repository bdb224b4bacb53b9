"""bench/report.py: each row's "x floor" is against the floor of the loss it computes.

TRL's reverse KL does OPD's work with 4+2 LM-head products; its ratio is to OPD's 3+1 floor, and
its TFLOP/s count the six products it performs.
"""
import lossbench  # bench/ is on pytest's pythonpath
import pytest
import report


def record(impl, seconds, products, floor=None, flops=1e12):
    r = dict(impl=impl, shape_id="S", seconds=seconds, products=list(products), flops=flops)
    return r if floor is None else dict(r, floor=floor)


def test_x_floor_is_against_the_floor_of_the_same_loss():
    records = report.add_ratios([
        record("floor", 5.0, (3, 2), "floor"),
        record("floor-opd", 4.0, (3, 1), "floor-opd"),
        record("liger-compiled", 6.0, (3, 1), "floor-opd"),
        record("trl", 12.0, (4, 2), "floor-opd", flops=3e12),
        record("vaopd-triton", 6.0, (3, 2), "floor"),
    ])
    by = {r["impl"]: r for r in records}
    assert by["trl"]["x_floor"] == pytest.approx(3.0)
    assert by["trl"]["x_liger"] == pytest.approx(2.0)
    assert by["trl"]["tflops"] == pytest.approx(0.25)
    assert by["vaopd-triton"]["x_floor"] == pytest.approx(1.2)
    assert by["floor-opd"]["x_floor"] == pytest.approx(1.0)


def test_saved_records_without_a_floor_match_on_products():
    records = report.add_ratios([record("floor-opd", 4.0, (3, 1)), record("vaopd-opd-triton", 5.0, (3, 1))])
    assert records[1]["x_floor"] == pytest.approx(1.25)


def test_every_benchmarked_implementation_has_a_work_and_a_floor():
    assert lossbench.WORK.keys() == lossbench.PRODUCTS.keys()
    assert lossbench.PRODUCTS["trl"] == (4, 2) and lossbench.WORK["trl"] == "opd"
    for impl, work in lossbench.WORK.items():
        assert lossbench.FLOORS[work] in lossbench.PRODUCTS, impl


@pytest.mark.slow  # two fresh processes building [tokens x vocab] logits
def test_cpu_peak_memory_is_measured_in_a_fresh_process_and_tells_the_paths_apart():
    # The benchmark's own process keeps glibc's default malloc (its timings); the probe's hands
    # freed blocks back to the OS, so its resident size follows live memory.
    shape = lossbench.Shape(1024, 32000, 64, 64, "fp32")
    reference = lossbench.peak_extra_bytes_fresh("reference", shape)
    fused = lossbench.peak_extra_bytes_fresh("vaopd-opd-torch", shape)
    logits = 1024 * 32000 * 4  # one fp32 [tokens x vocab] tensor, 125 MiB
    assert reference > 3 * logits  # full logits of both models, their softmaxes and gradients
    assert fused < 2 * logits  # one chunk of 1,024 rows at a time
