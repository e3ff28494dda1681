"""What the Model Zoo's CI checks for each bundle, through MONAI's public API."""

import json

import pytest
from conftest import BUNDLES, verify_bundle_metadata
from monai.bundle import verify_net_in_out
from test_bundle_conventions import BUNDLE_NAMES, SEGMENTATION_BUNDLES


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_is_valid_and_versioned(bundle, tmp_path):
    meta_file = BUNDLES / bundle / "configs" / "metadata.json"
    verify_bundle_metadata(meta_file, tmp_path)
    meta = json.loads(meta_file.read_text())
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_network_matches_metadata(bundle):
    configs = BUNDLES / bundle / "configs"
    verify_net_in_out(
        net_id="network_def", meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
        device="cpu", feature_size=12, **{"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64, 64],
                                          "_meta_#network_data_format#outputs#pred#spatial_shape": [64, 64, 64]},
    )  # fmt: skip
