"""bench/chips.py's peak table and byte counts, and bench/generation.py's use of them."""

import pytest

from bench import chips
from bench.generation import _lengths, _table, weight_bytes_per_step


@pytest.mark.parametrize(
    ("device", "cores", "bandwidth", "name"),
    [
        ("NVIDIA H200", None, 4800, "H200"),
        ("NVIDIA H200 NVL", None, 4800, "H200 NVL"),
        ("NVIDIA H100 80GB HBM3", None, 3350, "H100"),
        ("NVIDIA H100 PCIe", None, 2000, "H100 PCIe"),
        ("Apple M2", None, 100, "Apple M2"),
        ("Apple M2 Max", None, 400, "Apple M2 Max"),  # not the plain M2's row
        ("Apple M2 Ultra", None, 800, "Apple M2 Ultra"),
        ("Apple M4 Max", 14, 410, "Apple M4 Max"),
        ("Apple M4 Max", 16, 546, "Apple M4 Max"),
        ("Apple M4 Max", 12, 546, "Apple M4 Max"),  # unknown bin: the faster one (never an inflated MBU)
        ("Apple M3 Max", 14, 300, "Apple M3 Max"),
    ],
)
def test_chip_rows_are_found_by_device_name(device, cores, bandwidth, name):
    chip = chips.chip_for(device, cpu_cores=cores)
    assert chip is not None and chip.name == name and chip.bandwidth_gbs == bandwidth


def test_unknown_devices_have_no_row():
    assert chips.chip_for("AMD EPYC") is None
    assert chips.chip_for("NVIDIA GeForce RTX 4090") is None
    import mlx.core as mx

    here = chips.this_chip()  # MLX's own device name: a CPU has no row, the GPUs we run on have one
    assert (here is None) == (mx.default_device() == mx.cpu)


def test_every_row_says_its_source_and_flop_estimates_are_marked():
    for chip in chips.CHIPS:
        assert chip.source and chip.bandwidth_gbs > 0
        if chip.name.startswith("Apple") and chip.tflops is not None and chip.name != "Apple M1":
            assert chip.estimate  # Apple publishes no GPU FLOP/s beyond the M1's


def test_kv_bytes_of_the_smollm2_1p7b_shape():
    # 24 layers, 32 KV heads of 64, bf16: 2 x 24 x 32 x 64 x 2 bytes per cached position
    assert chips.kv_bytes_per_position(24, 32, 64, 2) == 196_608


def test_generation_bytes_is_the_sum_over_steps():
    weights, kv, prompts, new = 1000.0, 10.0, [5, 9, 2], [4, 1, 6]
    steps = max(new) - 1
    brute = steps * weights + sum(
        kv * (p + t) for p, n in zip(prompts, new, strict=True) for t in range(1, n)
    )
    assert chips.generation_bytes(weights, kv, prompts, new) == (brute, steps)
    step = chips.decode_step_bytes(weights, kv, [5 + 1, 2 + 1])  # first step: two sequences still going
    assert step == weights + kv * 9


def test_mbu_is_bytes_per_second_over_the_peak():
    assert chips.mbu(1000.0, 2.4e9, 4800) == pytest.approx(0.5)
    assert chips.mfu(494.5e12, chips.chip_for("NVIDIA H200")) == pytest.approx(0.5)
    assert chips.mfu(1e12, chips.chip_for("Apple M4")) is None


def test_weight_bytes_of_a_tied_model_count_every_parameter_once(tiny):
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(tiny.model.parameters()))
    assert "lm_head" not in tiny.model and weight_bytes_per_step(tiny.model) == total


def test_mixed_lengths_are_fixed_draws_in_range():
    lengths = _lengths(64, 128, mixed=True)
    assert lengths == _lengths(64, 128, mixed=True) and min(lengths) >= 16 and max(lengths) <= 128
    assert len(set(lengths)) > 10 and _lengths(3, 8, mixed=False) == [8, 8, 8]


def test_the_table_shows_ratios_and_mbu():
    row = {"blas": "gpu", "batch": 32, "decode_bytes": 4.8e12, "decode_seconds": 0.5, "repeat": 0}
    rows = [
        {**row, "sampler": "ours", "tokens": 2000, "seconds": 1.0},
        {**row, "sampler": "mlx_lm.batch_generate", "tokens": 1000, "seconds": 1.0, "decode_seconds": None},
    ]
    table = _table(rows, bandwidth_gbs=4800).splitlines()
    assert "| 32 | gpu | ours | 2000.0 | 2.00x | - | 100.0% | 200.0% |" in table
    assert "| 32 | gpu | mlx_lm.batch_generate | 1000.0 | 1.00x | - | 100.0% | - |" in table
