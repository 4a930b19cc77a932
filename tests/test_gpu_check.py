"""`bench/gpu_check.py --small` runs in `make test`, so the GPU check never goes stale; on
the CPU it also shows that no learning step waits for the device."""

from __future__ import annotations

import pytest

from bench.gpu_check import main


def test_the_gpu_check_runs_small_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    results = main(
        ["--small", "--stage2-classes", "50", "--stage2-steps", "2", "--predict-repeats", "1"]
    )
    assert {"preprocess", "encode_old", "stage1", "memory", "stage2"} <= set(results["seconds"])
    assert results["peak_memory"]["rss_mib"] > 0
    # The CPU counter sees one host read per stage-2 epoch (the replay counts), none in a
    # step; main read the logit scale in every step of both stages.
    syncs = results["syncs_per_step"]
    assert syncs["stage1"] == 0 and syncs["stage2"] < 1
    assert results["round_trip_identical"] is True
    assert set(results["predict_images_per_second"]) == {32, 256}
    assert results["stage2_ms_per_step"]["classes"] == 50
    printed = capsys.readouterr().out
    assert "syncs per step" in printed and "round trip bit-identical: True" in printed
