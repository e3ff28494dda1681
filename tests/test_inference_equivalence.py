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
# OpenVINO against PyTorch (the bounds in the model card): OpenVINO's float32 instance norm is the difference, larger
# with fewer threads (docs/performance.md, `ci/openvino_accuracy.py`), and the untrained weights' near-ties flip labels
OPENVINO_ATOL = 3e-3
MIN_AGREE = 0.999


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


def assert_labels_agree(first: np.ndarray, second: np.ndarray, min_dice: float = 0.999, min_agree: float = 0.0):
    """Dice of every label either map holds is at least `min_dice`, and the fraction of voxels with the same label
    at least `min_agree`."""
    assert first.shape == second.shape
    assert (first == second).mean() >= min_agree
    for label in np.union1d(np.unique(first), np.unique(second)):
        a, b = first == label, second == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= min_dice, f"label {label}"


def test_openvino_probabilities_match_pytorch(case):
    """`cpu_inference_engine` `openvino`: the network converted after the checkpoint is loaded (as in a run), its
    probabilities within 3e-3 of PyTorch's (stated in the model card) and its labels agreeing. The weights are
    untrained, so near-ties are common and a few flip: 99.9% of voxels agree, every label's Dice >= 0.99."""
    openvino = probabilities([INFERENCE], case, cpu_inference_engine="openvino")
    pytorch = probabilities([INFERENCE], case)
    conversions = [p for p in (case / "models" / "openvino").iterdir() if not p.name.startswith("compiled")]
    assert len(conversions) == 1 and (conversions[0] / "model.xml").is_file()  # one, beside the checkpoint
    assert openvino.shape == pytorch.shape and not torch.equal(openvino, pytorch)  # OpenVINO really ran
    torch.testing.assert_close(openvino, pytorch, atol=OPENVINO_ATOL, rtol=0)
    assert_labels_agree(openvino.argmax(1).numpy(), pytorch.argmax(1).numpy(), min_dice=0.99, min_agree=MIN_AGREE)


def test_label_maps_match_the_reference_path(case):
    """The shipped path, the reference recipe and (reusing the conversion cached by the test above) OpenVINO write
    label maps that agree."""
    runs = (("shipped", [INFERENCE], {}), ("reference", [INFERENCE, REFERENCE], {}),
            ("openvino", [INFERENCE], {"cpu_inference_engine": "openvino"}))  # fmt: skip
    logs = {}
    for name, configs, overrides in runs:
        proc = run_bundle(
            configs,
            dataset_dir=str(case / "images"),
            ckpt_dir=str(case / "models"),
            output_dir=str(case / name),
            **SETTINGS,
            **overrides,
        )
        logs[name] = proc.stdout + proc.stderr
    assert "OpenVINO: using the conversion of these weights" in logs["openvino"]
    shipped = np.asarray(nib.load(case / "shipped" / "case_seg.nii.gz").dataobj)
    assert shipped.shape == (110, 100, 40)
    assert_labels_agree(shipped, np.asarray(nib.load(case / "reference" / "case_seg.nii.gz").dataobj))
    openvino = np.asarray(nib.load(case / "openvino" / "case_seg.nii.gz").dataobj)
    assert_labels_agree(shipped, openvino, min_dice=0.99, min_agree=MIN_AGREE)


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


def test_openvino_takes_four_channel_inputs(tmp_path):
    """MSD's multi-sequence MRI tasks: a 4-channel network through OpenVINO matches PyTorch; `--amp True` (bfloat16
    autocast around the network) reuses the float32 conversion and compiles it for bfloat16."""
    from monai.networks.nets import SwinUNETR

    load_bundle_scripts("swin_unetr_msd")
    engine = importlib.import_module("scripts.openvino_engine")
    torch.manual_seed(1)
    network = SwinUNETR(4, 4, feature_size=TINY["feature_size"]).eval()
    image = torch.randn(1, 4, 64, 64, 64)
    with torch.no_grad():
        pytorch = network(image).softmax(1)
        openvino = engine.use_openvino(network, str(tmp_path / "cache"))(image).softmax(1)
    torch.testing.assert_close(openvino, pytorch, atol=OPENVINO_ATOL, rtol=0)
    assert_labels_agree(openvino.argmax(1).numpy(), pytorch.argmax(1).numpy(), min_dice=0.99, min_agree=MIN_AGREE)
    bfloat16 = engine.use_openvino(SwinUNETR(4, 4, feature_size=TINY["feature_size"]), str(tmp_path / "cache"), "bf16")
    bfloat16.load_state_dict(network.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = bfloat16(image).float().softmax(1)
    assert (
        len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("compiled")]) == 1
    )  # the same conversion
    assert (reduced - pytorch).abs().max() < 0.05  # bfloat16 where the CPU has it, else float32


def test_openvino_conversions_are_keyed_by_the_weights():
    """A new checkpoint never runs against a stale conversion: the cache key follows the weights' content (equal
    for a copy, different after any change), and loading weights into a converted network is noticed."""
    from monai.networks.nets import SwinUNETR

    load_bundle_scripts("swin_unetr_btcv")
    engine = importlib.import_module("scripts.openvino_engine")
    torch.manual_seed(2)
    network, copy = SwinUNETR(1, 14, feature_size=12), SwinUNETR(1, 14, feature_size=12)
    copy.load_state_dict(network.state_dict())
    shape = (1, 1, 64, 64, 64)
    assert engine.weights_key(network, shape) == engine.weights_key(copy, shape)
    assert engine.weights_key(network, shape) != engine.weights_key(network, (1, 1, 96, 96, 96))
    version = engine._weights_version(copy)
    with torch.no_grad():
        copy.out.conv.conv.bias[3] += 1e-6
    assert engine.weights_key(copy, shape) != engine.weights_key(network, shape)
    assert engine._weights_version(copy) != version
    version = engine._weights_version(copy)
    copy.load_state_dict(network.state_dict())  # a checkpoint loaded later, as MONAI Label does after training
    assert engine._weights_version(copy) != version


def test_openvino_missing_falls_back_to_pytorch_in_one_line(monkeypatch, caplog):
    from monai.networks.nets import SwinUNETR

    load_bundle_scripts("swin_unetr_btcv")
    cpu_network = importlib.import_module("scripts.cpu_network")
    monkeypatch.setattr(cpu_network, "openvino_available", lambda: False)
    network = SwinUNETR(1, 14, feature_size=12)
    with caplog.at_level("WARNING"):
        network = cpu_network.for_cpu_inference(network, engine="openvino", engine_cache_dir="unused")
    assert "cpu_inference_engine is 'openvino' but openvino is not installed: PyTorch runs the network." in caplog.text
    assert "forward" not in vars(network)  # PyTorch's forward ...
    assert "FastInstanceNorm3d" in {type(m).__name__ for m in network.modules()}  # ... with the CPU rewrites
    with pytest.raises(ValueError, match="cpu_inference_engine must be one of \\('torch', 'openvino'\\), got 'onnx'"):
        cpu_network.for_cpu_inference(network, engine="onnx")


def test_openvino_runs_a_fold_ensemble_as_one_model(case, tmp_path):
    """`checkpoints` with `cpu_inference_engine` `openvino`: the averaged members are converted as one network, and
    two copies of one checkpoint give that checkpoint's probabilities."""
    model = str(case / "models" / "model.pt")
    single = probabilities([INFERENCE], case)
    load_bundle_scripts("swin_unetr_btcv")
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    for key, value in dict(SETTINGS, ckpt_dir=str(tmp_path), checkpoints=[model, model],
                           cpu_inference_engine="openvino").items():  # fmt: skip
        parser[key] = value
    network = parser.get_parsed_content("network")
    assert type(network).__name__ == "ProbabilityEnsemble" and "forward" in vars(network)  # OpenVINO's forward
    item = parser.get_parsed_content("preprocessing")({"image": str(case / "images" / "case.nii.gz")})
    with torch.no_grad():
        ensemble = parser.get_parsed_content("inferer")(item["image"][None], network).softmax(1)
    assert list(tmp_path.glob("openvino/*/model.xml"))
    torch.testing.assert_close(ensemble, single, atol=OPENVINO_ATOL, rtol=0)
