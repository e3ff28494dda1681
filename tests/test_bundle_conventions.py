"""Every bundle has the Model Zoo layout and exposes the project's public settings (the developers' guide)."""

import contextlib
import json
import re
import sys

import pytest
from conftest import BUNDLES

BUNDLE_NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
REQUIRED_FILES = [
    "LICENSE", "large_files.yml", "docs/README.md", "configs/metadata.json", "configs/logging.conf",
    "configs/train.json", "configs/evaluate.json", "configs/multi_gpu_train.json",
]  # fmt: skip
SEGMENTATION_BUNDLES = [b for b in ("swin_unetr_btcv", "swin_unetr_msd") if b in BUNDLE_NAMES]  # they infer
TRAIN_SETTINGS = [
    "bundle_root", "dataset_dir", "datalist", "output_dir", "ckpt_dir", "device", "amp", "feature_size", "roi_size",
    "num_samples", "batch_size", "max_epochs", "val_interval", "learning_rate", "num_workers", "cache_rate",
    "seed",
]  # fmt: skip
FINE_TUNING_SETTINGS = ["pretrained_path", "use_pretrained", "num_train_cases"]
INFERENCE_SETTINGS = ["dataset_dir", "datalist", "output_dir", "roi_size", "sw_batch_size", "overlap", "device", "amp"]


def test_bundles_are_found():
    assert BUNDLE_NAMES == ["swin_unetr_btcv", "swin_unetr_msd", "swin_unetr_pretrain"]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_required_files(bundle):
    required = REQUIRED_FILES + (["configs/inference.json"] if bundle in SEGMENTATION_BUNDLES else [])
    missing = [f for f in required if not (BUNDLES / bundle / f).is_file()]
    assert not missing, f"{bundle} lacks {missing}"


def _settings_used(config_path, settings):
    config = json.loads(config_path.read_text())
    text = config_path.read_text()
    missing = [s for s in settings if s not in config]
    # a setting declared but never referenced would be overridable in name only
    unused = [s for s in settings if s != "bundle_root" and f"@{s}" not in text]
    return missing, unused


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_train_settings_are_exposed_and_used(bundle):
    settings = TRAIN_SETTINGS + (FINE_TUNING_SETTINGS if bundle != "swin_unetr_pretrain" else [])
    missing, unused = _settings_used(BUNDLES / bundle / "configs" / "train.json", settings)
    assert not missing and not unused, f"missing {missing}, never referenced {unused}"


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_inference_settings_are_exposed_and_used(bundle):
    missing, unused = _settings_used(BUNDLES / bundle / "configs" / "inference.json", INFERENCE_SETTINGS)
    assert not missing and not unused, f"missing {missing}, never referenced {unused}"


@pytest.mark.parametrize(
    "bundle, name", [(b, "train.json") for b in BUNDLE_NAMES] + [(b, "inference.json") for b in SEGMENTATION_BUNDLES]
)
def test_yes_no_settings_are_checked_first(bundle, name):
    """Each top-level true/false setting goes through `check_flags` before anything else runs (`--amp false` is
    text), right after the hook that repeats the bundle's own error message last."""
    config = json.loads((BUNDLES / bundle / "configs" / name).read_text())
    computed = {
        "amp",
        "cpu_memory_pool",
        "cpu_huge_pages",
        "cpu_fast_norm",
        "cpu_channels_last",
        "cpu_fused_upsampling",
        "cpu_fused_input_block",
        "cpu_mask_cache",
        "cpu_winograd",
    }  # yes/no settings whose inference defaults are expressions
    flags = {key for key, value in config.items() if isinstance(value, bool) or key in computed}
    flags.discard("save_execute_config")  # MONAI's own, read while the workflow is built (scripts/tracking.py)
    assert config["run"][:2] == ["$@error_summary", "$@flags_check"]
    assert config["flags_check"]["_target_"] == "scripts.checks.check_flags"
    assert {key for key in config["flags_check"] if key != "_target_"} == flags
    assert all(config["flags_check"][key] == f"@{key}" for key in flags)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_run_is_the_checks_and_the_engine_call(bundle):
    """Process settings are required by the engine, network rewrites are applied where the network is built, handlers
    are in the engine's handler list: `run` reads as the checks (after the hook that puts the bundle's own message
    last), then the run. They cannot go to `initialize`: MONAI puts the bundle's `scripts` on the path at `run`."""
    for name in ("train.json", "evaluate.json", "inference.json"):  # the workflows (task_bundle.json is a tool)
        path = BUNDLES / bundle / "configs" / name
        run = json.loads(path.read_text()).get("run") if path.is_file() else None
        if run is not None:
            assert run[0] == "$@error_summary", f"{path.name}: {run}"
            assert all(re.fullmatch(r"\$@\w+_check", step) for step in run[1:-1]), f"{path.name}: {run}"
            assert re.fullmatch(r"\$@[\w#]+\.run\(\)", run[-1]), f"{path.name}: {run}"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_override_configs_never_address_list_positions(bundle):
    """`train#handlers#2#_disabled_` silently disables another handler once the list changes; overrides name keys."""
    for path in (BUNDLES / bundle / "configs").glob("*.json"):
        if path.name not in ("train.json", "inference.json", "metadata.json"):
            positional = [key for key in json.loads(path.read_text()) if re.search(r"#\d+(#|$)", key)]
            assert not positional, f"{path.name}: {positional}"


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_inference_config_stands_alone_for_monai_label(bundle):
    text = (BUNDLES / bundle / "configs" / "inference.json").read_text()
    config = json.loads(text)
    assert "@_meta_" not in text  # MONAI Label does not load the metadata into the parser
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "bundle_root", "device"):
        assert key in config, key
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert next(iter(fmt["inputs"])) == "image" and next(iter(fmt["outputs"])) == "pred"
    assert all(k.isdigit() for k in fmt["outputs"]["pred"]["channel_def"])


def test_shared_helpers_are_copied_from_their_one_source():
    """Bundles must work when copied alone (Model Zoo, MONAI Label), so each carries a copy of the helpers it shares
    with another; `common_scripts/` holds the one to edit and `ci/sync_scripts.py` writes the copies."""
    sys.path.insert(0, str(BUNDLES.parent / "ci"))
    import sync_scripts

    assert sorted(p.name for p in sync_scripts.SOURCE.glob("*.py")) == sorted(sync_scripts.COPIES)
    assert sync_scripts.stale_copies() == []
    assert all(len(bundles) >= 2 for bundles in sync_scripts.COPIES.values())


def test_encoder_key_mapping_agrees_between_export_and_import():
    from conftest import load_bundle_scripts
    from monai.networks.nets import SwinUNETR

    load_bundle_scripts("swin_unetr_pretrain")
    from scripts.encoder_export import file_key as export_key

    keys = [k for k in SwinUNETR(1, 14, feature_size=12).state_dict() if k.startswith("swinViT.")]
    for bundle in SEGMENTATION_BUNDLES:
        load_bundle_scripts(bundle)
        from scripts.pretrained import file_key as import_key

        assert [export_key(k) for k in keys] == [import_key(k) for k in keys], bundle


@contextlib.contextmanager
def _scripts_of(bundle):
    """The bundle's `scripts` package, imported for the test; later tests get back the one they imported."""
    from conftest import load_bundle_scripts

    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "scripts"}
    scripts = load_bundle_scripts(bundle)
    import scripts.mixed_precision  # noqa: F401, F811  (imported here, while the bundle is on sys.path)

    try:
        yield scripts
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "scripts"]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
@pytest.mark.parametrize("device, amp", [("cpu", True), ("cpu", False), ("cuda:0", True)])
def test_amp_setting_picks_cuda_amp_or_cpu_bfloat16(bundle, device, amp):
    """`amp` turns on MONAI's CUDA AMP on a GPU and the bundle's bfloat16 autocast on a CPU, never both."""
    from monai.bundle import ConfigParser

    with _scripts_of(bundle) as scripts:
        _check_amp_wiring(bundle, device, amp, scripts.mixed_precision, ConfigParser)


def _check_amp_wiring(bundle, device, amp, mixed_precision, ConfigParser):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    parser["device"], parser["amp"] = f"$torch.device('{device}')", amp
    assert parser.get_parsed_content("cuda_amp") is (amp and device.startswith("cuda"))
    inferer = parser.get_parsed_content("train#inferer")
    assert isinstance(inferer, mixed_precision.AutocastInferer)
    expected = amp and device == "cpu" and mixed_precision.cpu_has_native_bfloat16()
    assert inferer.enabled is expected
    for engine in ("train#trainer#amp", "validate#evaluator#amp"):
        assert parser[engine] == "@cuda_amp", engine
    assert parser["train#trainer#optim_set_to_none"] is True
    # fused AdamW on CPU turned bfloat16-trained conv gradients into NaN within a few steps (torch 2.13), so the
    # optimizer stays on PyTorch's default (foreach) implementation
    assert "fused" not in parser["optimizer"]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_huge_pages_are_set_for_cpu_training_only(bundle, device):
    """On a GPU PyTorch has read its allocator settings before `run` starts (seen on an H100: the check reported
    that THP_MEM_ALLOC_ENABLE did not take), and the network's tensors are not CPU tensors anyway."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    parser["device"] = f"$torch.device('{device}')"
    assert parser.get_parsed_content("cpu_huge_pages") is (device == "cpu")
    assert parser.get_parsed_content("huge_pages#enabled") is (device == "cpu")
    # before anything allocates: the engine requires them first, and the ckpt_dir check requires the engine
    assert parser["train#trainer#_requires_"] == ["@huge_pages", "@memory_pool", "@mask_cache", "@mlflow_details"]
    assert parser["ckpt_dir_check#_requires_"].replace("::", "#") == "@train#trainer"
    assert list(parser["train#trainer"])[:2] == ["_target_", "_requires_"]


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_evaluation_moves_predictions_to_the_labels_device(bundle):
    """evaluate.json compares predictions inverted to each image's original space with the original labels, which
    stay on the CPU; on a GPU the inverted prediction was a CUDA tensor and Dice failed on mixed devices (H100)."""
    postprocessing = json.loads((BUNDLES / bundle / "configs" / "evaluate.json").read_text())["validate#postprocessing"]
    names = [t["_target_"] if isinstance(t, dict) else t for t in postprocessing["transforms"]]  # or a reference
    invert = postprocessing["transforms"][names.index("Invertd")]
    assert invert["device"] == "cpu"
    # the labels compared against are the original ones, copied in after the inversion, never moved to the GPU
    assert names.index("CopyItemsd") > names.index("Invertd") and "ToDeviced" not in names


@pytest.mark.parametrize(
    "config, key",
    [
        ("inference.json", "postprocessing"),
        ("evaluate.json", "validate#postprocessing"),
        ("train.json", "validate#postprocessing"),
    ],
)
@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_label_maps_are_monai_argmax_of_the_probabilities(bundle, config, key):
    """Inference, evaluation and validation take labels as the indices of torch.max, which is faster than MONAI's
    argmax on a CPU: the same labels (ties and NaN included) and the same image geometry."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from monai.transforms import AsDiscrete, AsDiscreted, Lambdad

    parser = ConfigParser()
    names = ["train.json", config] if config == "evaluate.json" else [config]
    parser.read_config([str(BUNDLES / bundle / "configs" / name) for name in names])
    with _scripts_of(bundle):
        transforms = parser.get_parsed_content(key).transforms
        labelling = next(t for t in transforms if type(t).__name__ == "ArgmaxLabelsd")
        assert type(labelling).__module__ == "scripts.labels"  # written once, in the bundle's scripts
    assert not any(isinstance(t, Lambdad) for t in transforms)
    assert not any(any(t.argmax) for t in transforms if isinstance(t, AsDiscreted))
    torch.manual_seed(0)
    probabilities = torch.rand(4, 9, 8, 7).round(decimals=1)  # many ties
    probabilities[2, 0, 0, 0] = float("nan")
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    labels = labelling({"pred": MetaTensor(probabilities, affine=affine)})["pred"]
    expected = AsDiscrete(argmax=True)(MetaTensor(probabilities, affine=affine))
    # float32 like MONAI's: SaveImaged converts it, while MONAI Label's ITK writer has no int64 images
    assert labels.shape == (1, 9, 8, 7) and labels.dtype == expected.dtype == torch.float32
    assert torch.equal(labels.as_tensor(), expected.as_tensor())
    assert torch.equal(labels.affine, affine)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_training_stops_at_a_non_finite_loss_before_its_checkpoint(bundle):
    """The check is attached before the interval checkpoint saver, so a NaN stops the run before it is saved."""
    handlers = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())["train"]["handlers"]
    targets = [handler["_target_"] for handler in handlers]
    check = targets.index("scripts.finite_loss.FiniteLossCheck")
    assert handlers[check] == {"_target_": "scripts.finite_loss.FiniteLossCheck", "ckpt_dir": "@ckpt_dir"}
    assert check < targets.index("scripts.checkpoints.SafeCheckpointSaver")


@pytest.mark.parametrize("device, on_cpu", [("cpu", True), ("cuda:0", False)])
@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_cpu_fine_tuning_keeps_freed_memory_and_trains_one_patch_per_pass(bundle, device, on_cpu):
    """The CPU defaults that made a 4-patch step faster than one pass without the pool, and the last upsampling folded
    into the convolutions after it, which made it faster and smaller again (docs/performance.md)."""
    from monai.bundle import ConfigParser

    with _scripts_of(bundle):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        parser["device"], parser["feature_size"] = device, 12
        assert parser.get_parsed_content("memory_pool#enabled") is on_cpu
        assert "@memory_pool" in parser["train#trainer#_requires_"]
        assert parser.get_parsed_content("flags_check")["cpu_fused_upsampling"] is on_cpu
        assert parser.get_parsed_content("prepared_network#fused_upsampling") is on_cpu
        if on_cpu:  # the network itself is built on the CPU only, where CI runs; rewritten in place where it is built
            network = parser.get_parsed_content("network")
            assert parser.get_parsed_content("network_def") is network
            assert type(network.decoder1).__name__ == "FusedUnetrUpBlock"
        assert parser["train#trainer#iteration_update"].replace("::", "#") == "@train#iteration"
        iteration = parser.get_parsed_content("train#iteration")
        assert type(iteration).__name__ == "PatchwiseIteration"
        assert iteration.patches_per_pass == (1 if on_cpu else None)
        assert type(parser.get_parsed_content("validate#inferer")).__name__ == "SlidingWindowInferer"
        evaluation = ConfigParser()  # evaluate.json overrides train.json and inherits the setting
        evaluation.read_config([str(BUNDLES / bundle / "configs" / f) for f in ("train.json", "evaluate.json")])
        evaluation["device"] = device
        assert evaluation.get_parsed_content("memory_pool#enabled") is on_cpu


@pytest.mark.parametrize("device, on_cpu", [("cpu", True), ("cuda:0", False)])
@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_cpu_inference_and_evaluation_run_instance_norms_through_group_norm(bundle, device, on_cpu):
    """Float32 CPU inference swaps the norms, keeps convolution weights channels-last, folds the last upsampling into
    the convolutions after it, normalises a single-channel image's residual branch in closed form, computes large 3^3
    convolutions with Winograd's F(4,3) and reuses attention masks (docs/performance.md); CUDA keeps MONAI's network
    as is."""
    from monai.bundle import ConfigParser

    configs = BUNDLES / bundle / "configs"
    with _scripts_of(bundle):
        for files in (["inference.json"], ["train.json", "evaluate.json"]):
            parser = ConfigParser()
            parser.read_config([str(configs / f) for f in files])
            parser["device"], parser["feature_size"] = device, 12
            assert parser.get_parsed_content("cpu_fast_norm") is on_cpu, files
            assert parser.get_parsed_content("flags_check")["cpu_fast_norm"] is on_cpu, files
            assert parser.get_parsed_content("cpu_channels_last") is on_cpu, files
            assert parser.get_parsed_content("flags_check")["cpu_fused_upsampling"] is on_cpu, files
            assert parser.get_parsed_content("flags_check")["cpu_fused_input_block"] is on_cpu, files
            assert parser.get_parsed_content("flags_check")["cpu_winograd"] is on_cpu, files
            assert parser.get_parsed_content("mask_cache#enabled") is on_cpu, files
            engine = "evaluator" if files == ["inference.json"] else "validate#evaluator"
            assert parser[f"{engine}#_requires_"][-3:] == ["@memory_pool", "@mask_cache", "@mlflow_details"], files
            if on_cpu:  # the network itself is built on the CPU only, where CI runs
                import torch

                network = parser.get_parsed_content("network")
                types = {type(m).__name__ for m in network.modules()}
                assert "FastInstanceNorm3d" in types and "InstanceNorm3d" not in types, files
                assert type(network.decoder1).__name__ == "FusedUnetrUpBlock", files
                single_channel = parser.get_parsed_content("network_def#in_channels") == 1
                assert (type(network.encoder1).__name__ == "FusedInputBlock") is single_channel, files
                assert type(network.decoder1.conv_block.conv2.conv).__name__ == "WinogradConv3d", files
                weights = [m.weight for m in network.modules() if isinstance(m, torch.nn.Conv3d)]
                assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights), files
            if on_cpu:  # OpenVINO instead of the rewrites, converted later (at the first window), beside the weights
                parser["cpu_inference_engine"], parser["ckpt_dir"] = "openvino", "/models"
                network = parser.get_parsed_content("network", lazy=False)
                assert type(network.forward).__name__ == "OpenVINOForward", files
                assert network.forward.cache_dir == "/models/openvino" and network.forward.precision == "f32", files
                assert "FastInstanceNorm3d" not in {type(m).__name__ for m in network.modules()}, files
                if files == ["inference.json"]:  # `--amp True`: OpenVINO's bfloat16
                    parser["amp"] = True
                    assert parser.get_parsed_content("network", lazy=False).forward.precision == "bf16"
        inference = ConfigParser()  # device-dependent defaults follow the chosen device, not what the machine has
        inference.read_config(str(configs / "inference.json"))
        inference["device"] = device
        assert inference.get_parsed_content("amp") is not on_cpu  # no bfloat16 on a CPU unless asked for
        assert inference.get_parsed_content("cpu_memory_pool") is on_cpu
        assert inference.get_parsed_content("sw_batch_size") == (1 if on_cpu else 4)
        training = ConfigParser()
        training.read_config(str(configs / "train.json"))
        training["device"], training["feature_size"] = "cpu", 12
        types = {type(m).__name__ for m in training.get_parsed_content("network").modules()}
        assert "FastInstanceNorm3d" not in types and "WinogradConv3d" not in types  # inference-only rewrites


@pytest.mark.parametrize("device, on_cpu", [("cpu", True), ("cuda:0", False)])
@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_cpu_training_computes_window_attention_in_groups_of_windows(bundle, device, on_cpu):
    """CPU training switches `network_def`'s window attention in place where the network is built
    (`prepared_network`, docs/performance.md), so that `multi_gpu_train.json`, which wraps the same object, gets it
    too, and reuses attention masks (evaluation too); CUDA keeps MONAI's blocks."""
    from monai.bundle import ConfigParser

    with _scripts_of(bundle):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        parser["device"], parser["feature_size"] = device, 12
        assert parser.get_parsed_content("cpu_attention_chunk_mb") == (128 if on_cpu else None)
        assert parser["train#trainer#_requires_"][1:3] == ["@memory_pool", "@mask_cache"]
        assert parser.get_parsed_content("mask_cache#enabled") is on_cpu  # reused shifted-window masks
        evaluation = json.loads((BUNDLES / bundle / "configs" / "evaluate.json").read_text())
        assert evaluation["validate#evaluator#_requires_"] == ["@memory_pool", "@mask_cache", "@mlflow_details"]
        network = parser.get_parsed_content("prepared_network")
        assert network is parser.get_parsed_content("network_def")
        types = {type(m).__name__ for m in network.modules()}
        assert ("ChunkedWindowAttention" in types) is on_cpu and ("WindowAttention" in types) is not on_cpu
        multi_gpu = json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())
        assert multi_gpu["network"]["module"] == "$@prepared_network.to(@device)" and "run" not in multi_gpu
        assert "initialize" not in multi_gpu and "+initialize" in multi_gpu  # appended to train.json's


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_changelog_entries_are_one_short_line(bundle):
    """As in the Model Zoo: a changelog entry says what changed in one line; measurements live in docs/."""
    changelog = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())["changelog"]
    long = {version: len(text) for version, text in changelog.items() if len(text) > 120 or "\n" in text}
    assert not long, f"entries over 120 characters: {long}"


@pytest.mark.parametrize("augment_left_right", [True, False])
@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_augment_left_right_switches_off_only_the_augmentations_that_swap_the_patients_sides(
    bundle, augment_left_right
):
    """`augment_left_right False` (short runs) zeroes the flip along the RAS left-right axis and the axial quarter
    turns; the other flips and the intensity augmentations keep the paper's probabilities, and each transform still
    draws its random numbers, so every other augmentation stays as it was for the same seed."""
    from monai.bundle import ConfigParser

    with _scripts_of(bundle):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        parser["augment_left_right"] = augment_left_right
        transforms = parser.get_parsed_content("train#random_transforms")
    swapping = 0.1 if augment_left_right else 0.0
    flips = {t.flipper.spatial_axis: t.prob for t in transforms if type(t).__name__ == "RandFlipd"}
    assert flips == {0: swapping, 1: 0.1, 2: 0.1}
    (turns,) = [t for t in transforms if type(t).__name__ == "RandRotate90d"]
    assert turns.prob == swapping and tuple(turns.spatial_axes) == (0, 1)
    assert [t.prob for t in transforms if type(t).__name__.startswith(("RandScale", "RandShift"))] == [0.1, 0.5]
