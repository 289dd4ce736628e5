import json
import subprocess
import sys

import pytest
import torch

from radapter.demo import run_demo

EXPECTED_KEYS = {
    "remerge_over_forward", "remerge_speedup_vs_matmul", "remerge_speedup_vs_wiseft", "remerge_over_floor",
    "merged_over_base_b1", "merged_over_base_b32", "unmerged_over_base_b32", "machine", "command", "date",
}


@pytest.mark.slow
def test_demo_trains_adapters_and_alpha_moves_between_models(tmp_path):
    results = run_demo(steps=120, out_dir=tmp_path)
    assert results["ID@1.0"] >= 90.0  # adapters learnt the task
    assert results["ID@0.0"] <= 40.0  # alpha = 0 is the untrained (random-init) model
    assert (tmp_path / "demo-adapter.safetensors").is_file()
    assert (tmp_path / "merged-open-clip" / "open_clip_model.safetensors").is_file()


def test_merge_benchmark_script_writes_its_keys(tmp_path):
    out = tmp_path / "merge.json"
    subprocess.run([sys.executable, "-m", "benchmarks.merge_bench", "--model", "radapter-tiny-vit",
                    "--reps", "2", "--reps-b32", "1", "--batch", "4", "--out", str(out)],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result.keys() >= EXPECTED_KEYS
    assert result["model"] == "radapter-tiny-vit" and result["adapters"] == 8


def test_train_cost_benchmark_script_writes_its_keys(tmp_path):
    out = tmp_path / "train_cost.json"
    subprocess.run([sys.executable, "-m", "benchmarks.train_cost", "--models", "radapter-tiny-vit", "--steps", "1",
                    "--warmup", "0", "--batch", "4", "--out", str(out)], check=True, capture_output=True)
    model = json.loads(out.read_text())["models"]["radapter-tiny-vit"]
    assert {"memory_ratio", "memory_ratio_rss", "step_time_ratio", "cpu_time_ratio", "flop_ratio",
            "saved_activations_ratio", "r_adapter", "lora", "full_ft", "lora_over_full_ft",
            "r_adapter_over_lora"} <= model.keys()
    assert len(model["r_adapter"]["step_s_all"]) == 1 and model["r_adapter"]["peak_tensor_mb"] > 0
    for run in (model["r_adapter"], model["lora"], model["full_ft"]):  # the phases add up to the step (timed round)
        phases = run["forward_s"] + run["backward_s"] + run["optimizer_s"]
        assert 0 < phases <= run["step_s"]
    assert 0 < model["flop_ratio"] < 1  # adapters' extra forward costs less than full FT's weight gradients
    assert 0 < model["saved_activations_ratio"] < 1  # frozen layers and adapters keep less than full FT
    assert model["r_adapter"]["trainable_parameters"] < model["full_ft"]["trainable_parameters"]
    assert 0 < model["lora"]["trainable_parameters"] < model["full_ft"]["trainable_parameters"]
    assert model["r_adapter_over_lora"]["trainable_parameters_ratio"] == pytest.approx(
        model["r_adapter"]["trainable_parameters"] / model["lora"]["trainable_parameters"])


def test_train_cost_counts_grouped_conv_gradients_like_their_forward():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.train_cost import _conv_backward_flops

    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        conv(x).sum().backward()
    forward = 2 * 2 * 8 * 9 * 100  # batch x channels x kernel x positions, multiply-adds
    assert counter.get_total_flops() == 3 * forward  # forward, input gradient, weight gradient
