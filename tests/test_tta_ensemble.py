"""Mirroring test-time augmentation (`tta`) and model ensembles (`checkpoints`, `inference_ensemble.json`)."""

import pytest
import torch
from conftest import BUNDLES, load_bundle_scripts
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer, SlidingWindowInferer

load_bundle_scripts("swin_unetr_btcv")
from scripts.ensemble import ProbabilityEnsemble, network_or_ensemble  # noqa: E402
from scripts.mirroring import MirroringInferer, mirror_axes  # noqa: E402


def tiny_network(seed: int) -> torch.nn.Module:
    """Two 3^3 convolutions: not mirror-symmetric, so every flip gives another prediction."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d
    return torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, 3, 3, padding=1))


def test_mirror_axes_are_the_eight_flips_unflipped_first():
    assert mirror_axes(3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


@pytest.mark.parametrize("inferer", [SimpleInferer(), SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.5)])
def test_tta_is_the_mean_of_the_mirrored_predictions(inferer):
    network = tiny_network(0).eval()
    image = torch.rand(1, 1, 12, 10, 9)
    with torch.no_grad():
        expected = torch.stack([
            torch.softmax(torch.flip(inferer(torch.flip(image, flip), network), flip), dim=1)
            for flip in mirror_axes(3)
        ]).mean(0)  # fmt: skip
        tta = torch.softmax(MirroringInferer(inferer, enabled=True)(image, network), dim=1)
        single = MirroringInferer(inferer, enabled=False)(image, network)
    torch.testing.assert_close(tta, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(single, inferer(image, network))  # tta off: the inferer itself
    assert (tta - torch.softmax(single, dim=1)).abs().max() > 1e-3  # the flips do change the prediction


def test_ensemble_of_two_identical_checkpoints_equals_one(tmp_path):
    network, other = tiny_network(0), tiny_network(1)
    torch.save(network.state_dict(), tmp_path / "a.pt")
    torch.save(network.state_dict(), tmp_path / "b.pt")
    torch.save(other.state_dict(), tmp_path / "c.pt")
    image = torch.rand(2, 1, 8, 8, 8)
    blank = tiny_network(2)  # the architecture: its own weights must not take part
    with torch.no_grad():
        twins = network_or_ensemble(blank, [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
        assert isinstance(twins, ProbabilityEnsemble) and len(twins.members) == 2
        torch.testing.assert_close(torch.softmax(twins(image), 1), torch.softmax(network(image), 1))
        pair = network_or_ensemble(blank, [str(tmp_path / "a.pt"), str(tmp_path / "c.pt")])
        mean = (torch.softmax(network(image), 1) + torch.softmax(other(image), 1)) / 2
        torch.testing.assert_close(torch.softmax(pair(image), 1), mean)
    assert network_or_ensemble(blank, None) is blank  # no `checkpoints`: the bundle's loader fills the network


def test_missing_and_mismatched_checkpoints_are_named(tmp_path):
    torch.save(tiny_network(0).state_dict(), tmp_path / "fold0.pt")
    torch.save(torch.nn.Conv3d(1, 5, 1).state_dict(), tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 missing: .*fold4\.pt$"):
        network_or_ensemble(tiny_network(0), [str(tmp_path / p) for p in ("fold0.pt", "fold0.pt", "fold4.pt")])
    with pytest.raises(ValueError, match=r"cannot load weights from .*other\.pt"):
        network_or_ensemble(tiny_network(0), [str(tmp_path / "fold0.pt"), str(tmp_path / "other.pt")])
    with pytest.raises(ValueError, match="must be a list"):
        network_or_ensemble(tiny_network(0), str(tmp_path / "fold0.pt"))


@pytest.mark.parametrize("bundle", ["swin_unetr_btcv", "swin_unetr_msd"])
@pytest.mark.parametrize("workflow", ["inference", "evaluate"])
def test_ensemble_config_averages_the_five_folds_in_inference_and_evaluation(bundle, workflow, tmp_path):
    configs = BUNDLES / bundle / "configs"
    files = {"inference": [configs / "inference.json"], "evaluate": [configs / "train.json", configs / "evaluate.json"]}
    files = files[workflow]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files + [configs / "inference_ensemble.json"]])
    parser.read_meta(str(configs / "metadata.json"))
    parser.update({"bundle_root": str(BUNDLES / bundle), "ckpt_dir": str(tmp_path), "feature_size": 12,
                   "device": "$torch.device('cpu')", "tta": True, "cpu_winograd": False})  # fmt: skip
    load_bundle_scripts(bundle)
    weights = parser.get_parsed_content("network_def", instantiate=True).state_dict()
    for fold in range(5):
        (tmp_path / f"fold{fold}").mkdir()
        torch.save(weights, tmp_path / f"fold{fold}" / "model.pt")
    prefix = "" if workflow == "inference" else "validate#"
    network = parser.get_parsed_content(parser[f"{prefix}evaluator#network"][1:])
    inferer = parser.get_parsed_content(parser[f"{prefix}evaluator#inferer"][1:])
    # class names: each bundle's `scripts` is its own package
    assert type(network).__name__ == "ProbabilityEnsemble" and len(network.members) == 5
    assert type(inferer).__name__ == "MirroringInferer" and inferer.enabled
    handlers = [type(h).__name__ for h in parser.get_parsed_content(f"{prefix}handlers")]
    assert "CheckedCheckpointLoader" not in handlers and "StatsHandler" in handlers  # folds load with the network
    member = network.members[0]
    torch.testing.assert_close(member.state_dict()["out.conv.conv.weight"], weights["out.conv.conv.weight"])
