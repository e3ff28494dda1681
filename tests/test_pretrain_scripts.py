"""Unit tests of the pre-training bundle's components (bundles/swin_unetr_pretrain/scripts)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import monai.transforms
import torch.nn.functional as F
from conftest import BUNDLES, load_bundle_scripts, synthetic_ct
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

load_bundle_scripts("swin_unetr_pretrain")
from scripts import (  # noqa: E402
    checked_load, datalist, encoder_export, gradient_clipping, prepare_batch, ssl_head, ssl_loss, transforms,
)  # fmt: skip

AXIAL = (1, 2)  # RAS axial plane of a channel-first (C, X, Y, Z) tensor


def test_heads_output_shapes():
    net = ssl_head.SSLHead(feature_size=12, projection_dim=32)
    out = net(torch.rand(2, 1, 64, 64, 64))
    assert out["rotation"].shape == (2, 4)
    assert out["contrastive"].shape == (2, 32)
    assert out["reconstruction"].shape == (2, 1, 64, 64, 64)


def test_disabled_head_is_not_built():
    net = ssl_head.SSLHead(feature_size=12, use_contrastive=False, use_rotation=False)
    assert set(net(torch.rand(1, 1, 64, 64, 64))) == {"reconstruction"}
    assert net.contrastive_head is None and net.rotation_head is None


def test_encoding_one_sub_volume_at_a_time_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    whole = ssl_head.SSLHead(feature_size=12, projection_dim=16)
    per_sample = ssl_head.SSLHead(feature_size=12, projection_dim=16, patches_per_pass=1)
    per_sample.load_state_dict(whole.state_dict())
    x = torch.rand(3, 1, 64, 64, 32)
    results = []
    for net in (whole, per_sample):
        out = net(x)
        sum(v.square().mean() for v in out.values()).backward()
        results.append((out, net.swinViT.layers1[0].blocks[1].attn.qkv.weight.grad))
    (out_a, grad_a), (out_b, grad_b) = results
    for key in ("rotation", "contrastive", "reconstruction"):
        torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-3, atol=1e-6)
    assert grad_a.abs().max() > 0
    for wrong in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"^cpu_patches_per_pass must be a whole number of 1 or more, or null"):
            ssl_head.SSLHead(feature_size=12, patches_per_pass=wrong)


def test_encoder_is_swinunetr_encoder():
    ssl_keys = {k for k in ssl_head.SSLHead(feature_size=12).state_dict() if k.startswith("swinViT.")}
    seg_keys = {k for k in SwinUNETR(1, 14, feature_size=12).state_dict() if k.startswith("swinViT.")}
    assert ssl_keys == seg_keys


def _nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out: for each of the 2N embeddings, -log(exp(s_pos/t) / sum_{k != i} exp(s_ik/t))."""
    z = torch.cat([a, b])
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        sims = [F.cosine_similarity(z[i], z[k], dim=0).item() for k in range(2 * n)]
        positive = sims[(i + n) % (2 * n)]
        denominator = sum(math.exp(s / temperature) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(positive / temperature) / denominator)
    return total / (2 * n)


def test_contrastive_term_is_nt_xent():
    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    loss = ssl_loss.SSLLoss(inpaint_weight=0, rot_weight=0, temperature=0.5)
    value = loss({"contrastive": torch.cat([a, b])}, {})
    assert value.item() == pytest.approx(_nt_xent(a, b, 0.5), rel=1e-5)
    assert loss.terms == {"contrast": pytest.approx(value.item())}


def _nt_xent_with_negatives(a: torch.Tensor, b: torch.Tensor, negatives: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out with `negatives` added to every view's denominator."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    q = F.normalize(negatives, dim=1)
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        others = [math.exp((z[i] @ z[k]).item() / temperature) for k in range(2 * n) if k != i]
        queued = [math.exp((z[i] @ q[k]).item() / temperature) for k in range(len(q))]
        positive = math.exp((z[i] @ z[(i + n) % (2 * n)]).item() / temperature)
        total += -math.log(positive / (sum(others) + sum(queued)))
    return total / (2 * n)


def test_contrast_queue_adds_the_projections_of_earlier_steps_as_negatives():
    """contrast_queue_size K: the first step is the paper's NT-Xent; later steps add the last K projections of
    earlier steps (both views, normalised, oldest replaced first) to every view's negatives."""
    torch.manual_seed(3)
    loss = ssl_loss.SSLLoss(inpaint_weight=0, rot_weight=0, queue_size=5, projection_dim=8)
    steps = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]  # 2 sub-volumes x 2 views per step
    first = loss({"contrastive": steps[0]}, {})
    assert first.item() == pytest.approx(_nt_xent(*steps[0].chunk(2), 0.5), rel=1e-5)
    second = loss({"contrastive": steps[1]}, {})
    assert second.item() == pytest.approx(_nt_xent_with_negatives(*steps[1].chunk(2), steps[0], 0.5), rel=1e-5)
    third = loss({"contrastive": steps[2]}, {})  # the queue holds step 1's last view and all of step 2's
    queued = torch.cat([steps[0][3:], steps[1]]).detach()
    assert third.item() == pytest.approx(_nt_xent_with_negatives(*steps[2].chunk(2), queued, 0.5), rel=1e-5)
    assert loss.terms == {"contrast": pytest.approx(third.item())}
    (first + second + third).backward()  # each step's queued negatives are kept for its backward pass
    assert all(step.grad is not None and step.grad.abs().sum() > 0 for step in steps)
    assert ssl_loss.QueuedContrastiveLoss(0.5, 5, 8)(*steps[0].chunk(2)).item() == pytest.approx(first.item())


def test_contrast_queue_is_checkpoint_state_and_validation_leaves_it_alone():
    """The queue travels in the loss's state_dict, so a resumed run continues with the same negatives; calls
    without gradients (validation) neither read a different queue nor add to it."""
    torch.manual_seed(4)
    loss = ssl_loss.SSLLoss(inpaint_weight=0, rot_weight=0, queue_size=6, projection_dim=8)
    for _ in range(2):
        loss({"contrastive": torch.randn(4, 8)}, {})
    resumed = ssl_loss.SSLLoss(inpaint_weight=0, rot_weight=0, queue_size=6, projection_dim=8)
    resumed.load_state_dict(loss.state_dict())
    batch = torch.randn(4, 8)
    with torch.no_grad():
        before = {k: v.clone() for k, v in loss.state_dict().items()}
        loss({"contrastive": batch}, {})
        assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())
    assert resumed({"contrastive": batch}, {}).item() == loss({"contrastive": batch}, {}).item()
    with pytest.raises(ValueError, match="contrast_queue_size"):
        ssl_loss.SSLLoss(queue_size=-1)
    with pytest.raises(ValueError, match="projection_dim"):
        ssl_loss.SSLLoss(inpaint_weight=0, rot_weight=0, queue_size=4, projection_dim=8)(
            {"contrastive": torch.randn(4, 6)}, {}
        )


def test_matching_views_score_lower_than_random_views():
    torch.manual_seed(1)
    a = torch.randn(4, 16)
    loss = ssl_loss.SSLLoss(inpaint_weight=0, rot_weight=0)
    matching = loss({"contrastive": torch.cat([a, a])}, {})
    random_pair = loss({"contrastive": torch.cat([a, torch.randn(4, 16)])}, {})
    assert matching < random_pair


def test_combined_loss_weights_and_terms():
    torch.manual_seed(2)
    pred = {
        "reconstruction": torch.rand(4, 1, 8, 8, 8),
        "contrastive": torch.randn(4, 6),
        "rotation": torch.randn(4, 4),
    }
    target = {"image": torch.rand(4, 1, 8, 8, 8), "rotation": torch.tensor([0, 1, 2, 3])}
    loss = ssl_loss.SSLLoss(inpaint_weight=2.0, contrast_weight=0.5, rot_weight=1.0)
    total = loss(pred, target)
    l1 = F.l1_loss(pred["reconstruction"], target["image"]).item()
    ce = F.cross_entropy(pred["rotation"], target["rotation"]).item()
    nt = _nt_xent(*pred["contrastive"].chunk(2), 0.5)
    assert loss.terms == pytest.approx({"inpaint": l1, "contrast": nt, "rotation": ce}, rel=1e-5)
    assert total.item() == pytest.approx(2.0 * l1 + 0.5 * nt + ce, rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        ssl_loss.SSLLoss(0, 0, 0)


def _pretrain_config() -> ConfigParser:
    """The pre-training train.json, with the bundle's `scripts` package the one in sys.modules: the parser locates
    `scripts.*` there, and another test module of the same worker may have imported another bundle's."""
    load_bundle_scripts("swin_unetr_pretrain")
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "swin_unetr_pretrain" / "configs" / "train.json"))
    return parser


def _validation_metrics(batches: list[dict], **settings) -> dict[str, float]:
    """The pre-training config's validation metrics, run over `batches` of evaluator outputs by an ignite engine."""
    from ignite.engine import Engine

    parser = _pretrain_config()
    parser["bundle_root"] = str(BUNDLES / "swin_unetr_pretrain")
    for key, value in dict(device="cpu", **settings).items():
        parser[key] = value
    metrics = dict(parser.get_parsed_content("validate#key_metric"))
    metrics.update(parser.get_parsed_content("validate#additional_metrics"))
    engine = Engine(lambda engine, batch: batch)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    return engine.run(batches).metrics


def _evaluator_output(sub_volumes: int, projections: torch.Tensor, seed: int = 0) -> dict:
    """What the SSL evaluator outputs for a batch of `sub_volumes` (two views each)."""
    generator = torch.Generator().manual_seed(seed)
    image = lambda: torch.rand(2 * sub_volumes, 1, 16, 16, 16, generator=generator)  # noqa: E731
    rotations = torch.arange(2 * sub_volumes) % 4
    return {
        "image": image(),
        "label": {"image": image(), "rotation": rotations},
        "pred": {"reconstruction": image(), "contrastive": projections, "rotation": torch.eye(4)[rotations]},
    }


def test_validation_reports_each_proxy_task_beside_its_chance_line():
    """The gates of the pre-training experiment read these: NT-Xent and its chance ln(2B - 1) (equal for
    projections that carry nothing, averaged over batches by their sub-volumes), and the L1 of the blurred
    corrupted input, the baseline the reconstruction must beat."""
    from monai.networks.layers import GaussianFilter

    torch.manual_seed(0)
    uninformative = [_evaluator_output(3, torch.ones(6, 8)), _evaluator_output(2, torch.ones(4, 8), seed=1)]
    metrics = _validation_metrics(uninformative)
    assert metrics["val_contrast_chance"] == pytest.approx((3 * math.log(5) + 2 * math.log(3)) / 5, rel=1e-6)
    assert metrics["val_contrast"] == pytest.approx(metrics["val_contrast_chance"], rel=1e-5)
    assert metrics["val_rotation_accuracy"] == 1.0
    blur = GaussianFilter(3, 1.0)
    blurred = [(blur(o["image"]) - o["label"]["image"]).abs() for o in uninformative]
    assert metrics["val_l1_blurred_input"] == pytest.approx(
        torch.cat([b.flatten() for b in blurred]).mean().item(), rel=1e-5
    )
    views = torch.randn(3, 8)
    matching = _validation_metrics([_evaluator_output(3, torch.cat([views, views]))])
    assert matching["val_contrast"] < 0.5 * matching["val_contrast_chance"]  # each view finds its partner
    wider = _validation_metrics(uninformative[:1], baseline_blur_sigma=2.0)["val_l1_blurred_input"]
    assert wider != pytest.approx(metrics["val_l1_blurred_input"], rel=1e-3)
    assert set(_validation_metrics(uninformative, contrast_weight=0.0, rot_weight=0.0)) == {
        "val_l1",
        "val_l1_blurred_input",
    }


def test_rotation_label_is_the_rotation_applied():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)  # no symmetry: each k differs
    seen = set()
    rotate = transforms.RandRotate90Labeld(keys="view", label_key="rot")
    for seed in range(20):
        rotate.set_random_state(seed)
        out = rotate({"view": image})
        k = int(out["rot"])
        seen.add(k)
        torch.testing.assert_close(torch.as_tensor(out["view"]), torch.rot90(image, k, dims=AXIAL))
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("max_fraction", [0.1, 0.3])
def test_cutout_fraction_within_bounds(max_fraction):
    cutout = transforms.RandInnerCutoutd(keys="view", max_fraction=max_fraction)
    image = torch.full((1, 32, 32, 32), 7.0)
    for seed in range(5):
        cutout.set_random_state(seed)
        changed = (cutout({"view": image})["view"] != 7.0).float().mean().item()
        assert 0.5 * max_fraction < changed <= max_fraction


def test_cutout_fills_from_donor_or_noise():
    image, donor = torch.zeros(1, 32, 32, 32), torch.full((1, 32, 32, 32), 5.0)
    out = transforms.RandInnerCutoutd(keys="view", donor_key="donor", donor_prob=1.0)({"view": image, "donor": donor})
    changed = out["view"][out["view"] != 0]
    assert changed.numel() > 0 and torch.all(changed == 5.0)
    noise = transforms.RandInnerCutoutd(keys="view", donor_key="donor", donor_prob=0.0)({"view": image, "donor": donor})
    filled = noise["view"][noise["view"] != 0]
    assert filled.numel() > 0 and filled.min() >= 0.0 and filled.max() <= 1.0


def test_training_views_keep_targets_uncorrupted(tmp_path):
    """The config's own transform chain: targets are the rotated crop, views differ from them by cutouts only."""
    image, _, affine = synthetic_ct.make_case(seed=0, shape=(100, 90, 36))
    synthetic_ct.save_nifti(image, affine, str(tmp_path / "ct.nii.gz"))
    parser = _pretrain_config()
    parser.update({"roi_size": [64, 64, 64], "num_samples": 2, "bundle_root": str(tmp_path)})
    samples = parser.get_parsed_content("train#preprocessing")({"image": str(tmp_path / "ct.nii.gz")})
    assert len(samples) == 2
    for sample in samples:
        assert set(sample) == {"view1", "view2", "target1", "target2", "rot1", "rot2"}
        unrotated1 = torch.rot90(torch.as_tensor(sample["target1"]), -int(sample["rot1"]), dims=AXIAL)
        unrotated2 = torch.rot90(torch.as_tensor(sample["target2"]), -int(sample["rot2"]), dims=AXIAL)
        torch.testing.assert_close(unrotated1, unrotated2)  # same sub-volume, uncorrupted
        for view, target in (("view1", "target1"), ("view2", "target2")):
            changed = (torch.as_tensor(sample[view]) != torch.as_tensor(sample[target])).float().mean().item()
            assert 0.0 < changed <= 0.3


def test_prepare_batch_stacks_views_in_order():
    batch = {
        "view1": torch.zeros(2, 1, 4, 4, 4), "view2": torch.ones(2, 1, 4, 4, 4),
        "target1": torch.full((2, 1, 4, 4, 4), 2.0), "target2": torch.full((2, 1, 4, 4, 4), 3.0),
        "rot1": torch.tensor([0, 1]), "rot2": torch.tensor([2, 3]),
    }  # fmt: skip
    inputs, targets = prepare_batch.SSLPrepareBatch()(batch, device="cpu")
    assert inputs.shape == (4, 1, 4, 4, 4) and inputs[:2].eq(0).all() and inputs[2:].eq(1).all()
    assert targets["image"][:2].eq(2).all() and targets["image"][2:].eq(3).all()
    assert targets["rotation"].tolist() == [0, 1, 2, 3]


def test_exported_encoder_has_released_layout_and_loads():
    torch.manual_seed(3)
    net = ssl_head.SSLHead(feature_size=12)
    exported = encoder_export.EncoderCheckpoint(net).state_dict()
    weights = exported["state_dict"]
    assert list(exported) == ["state_dict"]
    assert "module.patch_embed.proj.weight" in weights and "module.layers1.0.blocks.0.mlp.fc1.weight" in weights
    seg = SwinUNETR(1, 14, feature_size=12)
    seg.load_from(exported)
    for key, value in net.swinViT.state_dict().items():
        if "relative_position_index" not in key:
            torch.testing.assert_close(seg.swinViT.state_dict()[key], value)


def test_gradient_clipping_bounds_the_norm():
    net = torch.nn.Linear(4, 4)
    (net(torch.ones(1, 4)) * 1000).sum().backward()
    engine = SimpleNamespace(amp=False, scaler=None, optimizer=None, network=net)
    gradient_clipping.GradientClipHandler(max_norm=1.0)(engine)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters()))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)


def test_datalist_from_folder_glob(tmp_path):
    synthetic_ct.generate(str(tmp_path), num_train=4, num_test=1, shape=(32, 32, 8))
    split = datalist.build_unlabelled_datalist(str(tmp_path), image_glob="images*/*.nii.gz", val_fraction=0.2)
    assert len(split["training"]) == 4 and len(split["validation"]) == 1
    # a plain folder of images, with the config's default glob
    default_glob = _pretrain_config()["image_glob"]
    split = datalist.build_unlabelled_datalist(str(tmp_path / "imagesTr"), image_glob=default_glob, val_fraction=0.2)
    assert len(split["training"]) + len(split["validation"]) == 4 and split["validation"]
    with pytest.raises(FileNotFoundError, match="no images matching image_glob"):
        datalist.build_unlabelled_datalist(str(tmp_path), image_glob="*.mha")
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        datalist.build_unlabelled_datalist(str(tmp_path / "missing"))


def test_several_datalists_with_base_dirs(tmp_path):
    for name in ("a", "b"):
        synthetic_ct.generate(str(tmp_path / name), num_train=2, num_test=0, shape=(32, 32, 8))
        items = [{"image": f"imagesTr/img000{i}.nii.gz"} for i in (1, 2)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"training": items[:1], "validation": items[1:]}))
    split = datalist.build_unlabelled_datalist(
        datalist=[{"path": str(tmp_path / "a.json"), "base_dir": str(tmp_path / "a")},
                  {"path": str(tmp_path / "b.json"), "base_dir": str(tmp_path / "b")}],
    )  # fmt: skip
    assert [d["image"] for d in split["training"]] == [str(tmp_path / n / "imagesTr/img0001.nii.gz") for n in "ab"]
    assert len(split["validation"]) == 2
    with pytest.raises(FileNotFoundError, match="listed image"):
        datalist.build_unlabelled_datalist(datalist=str(tmp_path / "a.json"))  # relative to the JSON's folder


def test_rotation_in_the_released_codes_plane():
    """`rotation_axes` [1, 2] turns the sagittal plane, as the paper's released code does."""
    image = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4)
    rotate = transforms.RandRotate90Labeld(keys="view", label_key="rot", spatial_axes=(1, 2))
    for seed in range(8):
        rotate.set_random_state(seed)
        out = rotate({"view": image})
        torch.testing.assert_close(torch.as_tensor(out["view"]), torch.rot90(image, int(out["rot"]), dims=(2, 3)))


def test_rotation_plane_must_have_equal_sides():
    transforms.check_rotation_plane([96, 96, 64], [0, 1])
    transforms.check_rotation_plane([64, 96, 96], [1, 2])
    with pytest.raises(ValueError) as error:
        transforms.check_rotation_plane([96, 80, 64], [0, 1])
    assert str(error.value) == (
        "roi_size [96, 80, 64] has sides 96 and 80 in the rotation plane rotation_axes=[0, 1]; they must be equal so "
        "that rotated views keep their shape."
    )
    with pytest.raises(
        ValueError, match="rotation_axes must be two different spatial axes out of 0, 1, 2, got \\[1, 1\\]"
    ):
        transforms.check_rotation_plane([96, 96, 96], [1, 1])


def test_uniform_cutout_budget_varies_up_to_the_maximum():
    """`budget="uniform"` (the released code's) draws each view's share from [0, max): shares spread over the
    range, with a mean near half the maximum; the default fills close to the maximum every time."""
    image = torch.full((1, 32, 32, 32), 7.0)
    shares = {}
    for budget in ("max", "uniform"):
        cutout = transforms.RandInnerCutoutd(keys="view", max_fraction=0.3, budget=budget)
        cutout.set_random_state(0)
        shares[budget] = [(cutout({"view": image})["view"] != 7.0).float().mean().item() for _ in range(40)]
    assert min(shares["max"]) > 0.25 and max(shares["max"]) <= 0.3
    assert max(shares["uniform"]) <= 0.3 and min(shares["uniform"]) < 0.08 and max(shares["uniform"]) > 0.22
    assert 0.1 < np.mean(shares["uniform"]) < 0.2
    with pytest.raises(ValueError, match="cutout_budget must be one of \\('max', 'uniform'\\), got 'half'"):
        transforms.RandInnerCutoutd(keys="view", budget="half")


@pytest.mark.parametrize("pixdim, expected", [([1.5, 1.5, 2.0], [1.5, 1.5, 2.0]), ([-1, -1, -1], [1.0, 1.0, 2.5])])
def test_pixdim_resamples_or_keeps_the_images_spacing(pixdim, expected, tmp_path):
    """The model card's way to pre-train without resampling, as the released code does: non-positive `pixdim`."""
    image, _, affine = synthetic_ct.make_case(seed=0, shape=(48, 44, 12), spacing=(1.0, 1.0, 2.5))
    synthetic_ct.save_nifti(image, affine, str(tmp_path / "ct.nii.gz"))
    parser = _pretrain_config()
    parser.update({"pixdim": pixdim, "bundle_root": str(tmp_path)})
    resample = monai.transforms.Compose(parser.get_parsed_content("train#deterministic_transforms")[:3])
    out = resample({"image": str(tmp_path / "ct.nii.gz")})["image"]
    np.testing.assert_allclose(out.pixdim.tolist(), expected, atol=1e-5)


def test_cutout_rejects_bad_fraction():
    with pytest.raises(ValueError, match="max_fraction"):
        transforms.RandInnerCutoutd(keys="view", max_fraction=1.5)
    assert np.isclose(transforms.RandInnerCutoutd(keys="v").max_fraction, 0.3)


@pytest.mark.parametrize("override, dataset_type", [
    (None, "CacheDataset"), ("dataset_persistent.json", "PersistentDataset"),
    ("dataset_smartcache.json", "SmartCacheDataset"),
])  # fmt: skip
def test_dataset_choices_build(override, dataset_type, tmp_path):
    synthetic_ct.generate(str(tmp_path / "ct"), num_train=3, num_test=0, shape=(48, 44, 12))
    load_bundle_scripts("swin_unetr_pretrain")
    configs = BUNDLES / "swin_unetr_pretrain" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json")] + ([str(configs / override)] if override else []))
    plain = ConfigParser()
    plain.read_config(str(configs / "train.json"))
    # an override changes where the data comes from, not what a run does (memory settings, progress bar)
    assert parser["run"] == plain["run"] and parser["initialize"] == plain["initialize"]
    parser.update(
        {
            "dataset_dir": str(tmp_path / "ct"),
            "image_glob": "imagesTr/*.nii.gz",
            "roi_size": [32, 32, 32],
            "feature_size": 12,
            "bundle_root": str(tmp_path),
            "num_workers": 0,
            "smartcache_num": 1,
            "val_fraction": 0.34,
        }
    )
    dataset = parser.get_parsed_content("train#dataset")
    assert type(dataset).__name__ == dataset_type
    assert len(dataset) == (1 if dataset_type == "SmartCacheDataset" else 2)
    assert set(dataset[0][0]) == {"view1", "view2", "target1", "target2", "rot1", "rot2"}
    handlers = [type(h).__name__ for h in parser.get_parsed_content("train#trainer#train_handlers")]
    assert ("SmartCacheHandler" in handlers) == (dataset_type == "SmartCacheDataset")


@pytest.mark.parametrize("device, pool, pass_size", [("cpu", True, 1), ("cuda:0", False, None)])
def test_cpu_training_keeps_freed_memory_and_encodes_one_sub_volume_at_a_time(device, pool, pass_size):
    """On a CPU the pool keeps a step fast, and one sub-volume per encoder pass keeps its peak down."""
    parser = _pretrain_config()
    parser["device"] = device
    assert parser.get_parsed_content("cpu_memory_pool") is pool
    assert parser.get_parsed_content("memory_pool#enabled") is pool
    assert parser.get_parsed_content("network_def#patches_per_pass") == pass_size


def test_gradient_clipping_inside_supervised_trainer():
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    data = [{"image": torch.ones(2, 4) * 100, "label": torch.zeros(2, 1)}]
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=data, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
        loss_function=torch.nn.MSELoss(), train_handlers=[gradient_clipping.GradientClipHandler(max_norm=0.01)],
    )  # fmt: skip
    trainer.run()
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-3)  # SGD step = lr x clipped gradient


@pytest.mark.parametrize("breakage, message", [
    ("truncated", "cannot be read"),
    ("2d", "has shape (48, 44) with 1 channel(s); pre-training needs single-channel 3-D volumes"),
    ("nan", "holds 7 NaN or infinite voxels"),
])  # fmt: skip
def test_volumes_are_checked_where_they_are_loaded_and_named(breakage, message, tmp_path):
    image, _, affine = synthetic_ct.make_case(seed=3, shape=(48, 44, 12))
    path = str(tmp_path / "ct.nii.gz")
    synthetic_ct.save_nifti(image, affine, path)
    load = checked_load.CheckedLoadImaged("image")
    assert load({"image": path})["image"].shape == (1, 48, 44, 12)
    if breakage == "2d":
        synthetic_ct.save_nifti(image[..., 0], affine, path)
    elif breakage == "nan":
        image = image.astype(np.float32)
        image.flat[:7] = np.inf
        synthetic_ct.save_nifti(image, affine, path)
    else:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError) as error:
        load({"image": path})
    assert repr(path) in str(error.value) and message in str(error.value), str(error.value)
