"""The shipped (faster) BTCV inference path gives the reference path's outputs on the same weights and input.

Reference = the Model Zoo recipe the benchmark compares against (`ci/benchmark/reference_btcv_infer.json`): MONAI's
own attention instead of SDPA, sliding-window batch 4, no denormal flush, no CPU memory pool.
"""

import importlib
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, REPO, TINY, load_bundle_scripts, run_bundle, synthetic_ct
from monai.bundle import ConfigParser

# sliding-window batch size is one of the differences under test, so it is not overridden
SETTINGS = {k: v for k, v in TINY.items() if k != "sw_batch_size"}
INFERENCE = BUNDLES / "swin_unetr_btcv" / "configs" / "inference.json"
REFERENCE = REPO / "ci" / "benchmark" / "reference_btcv_infer.json"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A non-RAS synthetic CT and a tiny network's weights (trained weights are not needed to compare paths)."""
    root = tmp_path_factory.mktemp("equivalence")
    image, _, affine = synthetic_ct.make_case(seed=4, shape=(110, 100, 40))
    (root / "images").mkdir()
    synthetic_ct.save_nifti(image, affine, str(root / "images" / "case.nii.gz"))
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(SwinUNETR(1, 14, feature_size=TINY["feature_size"]).state_dict(), root / "models" / "model.pt")
    return root


def probabilities(config_files, root, winograd_min_channels=None, **overrides):
    """Softmax output of the config's preprocessing, network and inferer for the case, before inversion."""
    load_bundle_scripts("swin_unetr_btcv")
    if winograd_min_channels is not None:
        importlib.import_module("scripts.winograd_conv").MIN_CHANNELS = winograd_min_channels
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    settings = dict(SETTINGS, dataset_dir=str(root / "images"), ckpt_dir=str(root / "models"), **overrides)
    for key, value in settings.items():
        parser[key] = value
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    network.eval()
    item = parser.get_parsed_content("preprocessing")({"image": str(root / "images" / "case.nii.gz")})
    with torch.no_grad():
        return parser.get_parsed_content("inferer")(item["image"][None], network).softmax(1)


def test_probabilities_match_the_reference_path(case):
    # the tiny network's maps are narrower than `cpu_winograd` takes by default; lowered so that it is compared too
    shipped = probabilities([INFERENCE], case, winograd_min_channels=TINY["feature_size"])
    assert not torch.equal(shipped, probabilities([INFERENCE], case, cpu_winograd=False))  # F(4,3) ran
    reference = probabilities([INFERENCE, REFERENCE], case)
    assert shipped.shape == reference.shape and shipped.shape[1] == 14
    torch.testing.assert_close(shipped, reference, atol=1e-4, rtol=1e-4)
    agree = (shipped.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.9999


def test_label_maps_match_the_reference_path(case):
    for name, configs in (("shipped", [INFERENCE]), ("reference", [INFERENCE, REFERENCE])):
        run_bundle(
            configs,
            dataset_dir=str(case / "images"),
            ckpt_dir=str(case / "models"),
            output_dir=str(case / name),
            **SETTINGS,
        )
    shipped = np.asarray(nib.load(case / "shipped" / "case_seg.nii.gz").dataobj)
    reference = np.asarray(nib.load(case / "reference" / "case_seg.nii.gz").dataobj)
    assert shipped.shape == reference.shape == (110, 100, 40)
    for label in np.union1d(np.unique(shipped), np.unique(reference)):
        a, b = shipped == label, reference == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.999, f"label {label}"


def test_opt_in_bfloat16_inference_stays_close_to_float32(case):
    """`--amp True` on a CPU with native bfloat16 (the default stays float32 there, which the tests above pin)."""
    bfloat16 = probabilities([INFERENCE], case, device="cpu", amp=True)
    float32 = probabilities([INFERENCE], case, device="cpu")
    if not sys.modules["scripts.mixed_precision"].cpu_has_native_bfloat16():
        assert torch.equal(bfloat16, float32)  # no emulated bfloat16: it would be slower than float32
        return
    assert not torch.equal(bfloat16, float32)  # really computed in bfloat16 ...
    assert (bfloat16 - float32).abs().max() < 0.05  # ... close to float32 (measured: 0.027) ...
    agree = (bfloat16.argmax(1) == float32.argmax(1)).float().mean().item()
    assert agree >= 0.97  # ... labels differ at near-ties, many for untrained weights (measured: 0.987)
