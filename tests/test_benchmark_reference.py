"""The benchmark's reference recipes (`ci/benchmark/reference_*.json`) switch off every CPU speed setting the bundles
ship, so that the performance page's ratios compare the bundles with the Model Zoo / paper recipe and not with
themselves."""

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
OFF = {"cpu_memory_pool": False, "cpu_huge_pages": False, "cpu_fast_norm": False, "cpu_channels_last": False,
       "cpu_fused_upsampling": False, "cpu_fused_input_block": False, "cpu_winograd": False, "cpu_mask_cache": False,
       "cpu_patches_per_pass": None, "cpu_attention_chunk_mb": None, "cpu_inference_engine": "torch"}  # fmt: skip
RECIPES = [("swin_unetr_btcv", "train.json", "btcv_train"), ("swin_unetr_btcv", "inference.json", "btcv_infer"),
           ("swin_unetr_pretrain", "train.json", "ssl_train")]  # fmt: skip


@pytest.mark.parametrize("bundle, config, workload", RECIPES)
def test_reference_recipe_switches_off_the_shipped_cpu_settings(bundle, config, workload):
    shipped_file = REPO / "bundles" / bundle / "configs" / config
    reference_file = REPO / "ci" / "benchmark" / f"reference_{workload}.json"
    shipped = json.loads(shipped_file.read_text())
    settings = [key for key in shipped if key in OFF or key.startswith("cpu_")]
    assert set(settings) <= set(OFF), f"{config} has a CPU setting the reference must switch off: {settings}"
    parser = ConfigParser()
    parser.read_config([str(shipped_file), str(reference_file)])
    parser["device"] = "cpu"
    values = {key: parser.get_parsed_content(key) for key in settings}
    assert settings and values == {key: OFF[key] for key in settings}
    assert not any("flush_denormal" in str(step) for step in parser["initialize"])
    if shipped["network_def"].get("use_flash_attention"):  # MONAI's SDPA path: the recipe uses its plain attention
        assert parser["network_def"]["use_flash_attention"] is False
