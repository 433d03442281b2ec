"""``HFHPC_PROFILE_STEPS``: the profile of a few training steps, by kind of kernel, with idle time."""

from __future__ import annotations

from types import SimpleNamespace

from hfhpc.recipes.profile import steps_to_profile, summarize


def test_steps_to_profile_reads_a_range_and_refuses_others(monkeypatch, capsys):
    monkeypatch.setenv("HFHPC_PROFILE_STEPS", "6-8")
    assert steps_to_profile() == (6, 8)
    for bad in ("8-6", "0-2", "six"):
        monkeypatch.setenv("HFHPC_PROFILE_STEPS", bad)
        assert steps_to_profile() is None
        assert f"HFHPC_PROFILE_STEPS='{bad}' is not A-B" in capsys.readouterr().out
    monkeypatch.delenv("HFHPC_PROFILE_STEPS")
    assert steps_to_profile() is None


def test_summary_sorts_kernels_into_kinds_and_counts_idle_time():
    events = [SimpleNamespace(key=k, self_device_time_total=us, device_type="DeviceType.CUDA") for k, us in (
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 300_000), ("nvjet_tst_128x256", 100_000),
        ("flash_fwd_kernel", 150_000), ("triton_red_fused_rms_norm_0", 50_000),
        ("multi_tensor_apply_kernel<FusedAdam>", 40_000), ("aten::mm", 0), ("elementwise_kernel", 10_000))]
    # The operator that launched the gemm carries its time again: not counted twice.
    events.append(SimpleNamespace(key="aten::mm", self_device_time_total=400_000, device_type="DeviceType.CPU"))
    text = summarize(events, wall_s=1.0, steps=2)
    lines = text.splitlines()
    # 650 ms busy of 1 s over two steps: 325 ms busy and 175 ms idle per step.
    assert lines[0] == "2 step(s), 500.0 ms per step; GPU busy 325.0 ms, idle 175.0 ms (35.0%)"
    assert "matmul:     200.0 ms per step ( 40.0% of the wall time)" in text
    assert "attention:      75.0 ms per step" in text and "compiled fusion:      25.0 ms" in text
    assert "optimizer:      20.0 ms" in text and "other:       5.0 ms" in text
    assert lines[lines.index("busiest kernels (ms per step):") + 1].endswith("sm90_xmma_gemm_bf16bf16_bf16f32")


def test_ready_to_train_names_the_seconds_of_each_start_up_phase(monkeypatch):
    from hfhpc.recipes import common

    monkeypatch.setattr(common, "STARTED", 100.0)
    monkeypatch.setattr(common, "_MARKS", [("imports", 106.5), ("data", 107.0), ("model", 110.25)])
    assert common.phases_line(112.0) == "imports 6.5 s, data 0.5 s, model 3.2 s, the rest 1.8 s"
    monkeypatch.setattr(common, "_MARKS", [])
    assert common.phases_line(112.0) == ""
