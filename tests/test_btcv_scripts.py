"""Unit tests of the BTCV bundle's own components (bundles/swin_unetr_btcv/scripts)."""

import collections
import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import load_bundle_scripts, read_back_dicom_seg, synthetic_ct, write_encoder_file
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric
from monai.networks.nets import SwinUNETR

BTCV = Path(__file__).resolve().parents[1] / "bundles" / "swin_unetr_btcv"
scripts = load_bundle_scripts("swin_unetr_btcv")
from scripts import (  # noqa: E402
    checkpoints, checks, curves, datalist, dicom_seg, fast_norm, finite_loss, fused_input_block, fused_upsampling,
    metrics, mixed_precision, overlays, patchwise, pretrained, window_attention, winograd_conv,
)  # fmt: skip


@pytest.fixture()
def small_btcv(tmp_path):
    return synthetic_ct.generate(str(tmp_path / "btcv"), num_train=5, num_test=1, shape=(48, 44, 12), seed=4)


def test_bundle_root_is_the_bundle_folder():
    root = scripts.bundle_root()
    assert os.path.isfile(os.path.join(root, "configs", "train.json"))


def test_training_curves_log_the_loss_and_the_key_metric_at_the_trainer_iteration(tmp_path):
    """MONAI's MetricLogger records, its plot_metric_graph draws: after each validation and at the end."""
    from ignite.engine import Engine, Events

    validator = Engine(lambda engine, batch: None)
    validator.state.key_metric_name = "val_mean_dice"
    validator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=0.1 * e.state.epoch))
    trainer = Engine(lambda engine, batch: [{"loss": torch.tensor(1.0 / (engine.state.iteration + 1))}])
    plot = curves.TrainingCurvesPlot(str(tmp_path), validator=validator)
    plot.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), lambda _: validator.run([0]))
    trainer.run(range(5), max_epochs=4)
    assert [step for step, _ in plot.loss] == list(range(1, 21)) and plot.loss[0][1] == pytest.approx(0.5)
    assert plot.metrics["val_mean_dice"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.1))]
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_csv_holds_each_validation_with_per_class_means_named_from_label_one(tmp_path):
    """One row per validation (trainer iteration and epoch, seconds, key metric), and each class's mean over cases
    of the metric's details, ignoring NaN (a class absent from a case); background left out, so the columns take
    the names of labels 1 and 2."""
    import csv

    from ignite.engine import Engine, Events

    details = torch.tensor([[0.2, float("nan")], [0.4, 0.6]])

    def score(engine):
        engine.state.metrics["val_mean_dice"] = 0.1 * engine.state.epoch
        engine.state.metric_details = {"val_mean_dice": details * engine.state.epoch}

    validator = Engine(lambda engine, batch: None)
    validator.state.key_metric_name = "val_mean_dice"
    validator.add_event_handler(Events.COMPLETED, score)
    trainer = Engine(lambda engine, batch: [{"loss": torch.tensor(1.0)}])
    names = {"0": "background", "1": "spleen", "2": "right kidney"}
    plot = curves.TrainingCurvesPlot(str(tmp_path), validator=validator, label_names=names)
    plot.attach(trainer)
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED(every=2), lambda _: validator.run([0], max_epochs=trainer.state.epoch)
    )
    trainer.run(range(3), max_epochs=4)
    with open(tmp_path / "training_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["iteration"], r["epoch"]) for r in rows] == [("6", "2"), ("12", "4")]
    assert list(rows[0]) == ["iteration", "epoch", "seconds", "val_mean_dice", "spleen", "right kidney"]
    assert [float(r["spleen"]) for r in rows] == pytest.approx([0.6, 1.2])  # (0.2 + 0.4) / 2 x epoch 2, then 4
    assert [float(r["right kidney"]) for r in rows] == pytest.approx([1.2, 2.4])  # the NaN case left out
    assert 0 <= float(rows[0]["seconds"]) <= float(rows[1]["seconds"])
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_overlay_edges_name_where_the_patient_is():
    """A blob at the patient's right, anterior and superior side of an LPS-stored volume appears, in every view, at
    the edges the pictures label R, A and S; in the radiological convention, the patient's right is on the viewer's
    left in axial and coronal views."""
    volume = np.zeros((40, 30, 20))  # LPS: index 0 grows to the patient's left, 1 to posterior, 2 to superior
    volume[2:6, 2:6, 15:19] = 1
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.diag([0.8, 0.8, 2.5, 1.0])
    ras = overlays._to_ras(volume, lps)
    slices = overlays.view_slices(ras, [int(c) for c in np.argwhere(ras > 0).mean(0)])
    for view, (left, right, top, bottom) in overlays.VIEW_EDGES.items():
        rows, cols = np.argwhere(slices[view] > 0).mean(0) / np.array(slices[view].shape)
        horizontal = right if cols > 0.5 else left
        vertical = top if rows < 0.5 else bottom
        assert {"axial": ("R", "A"), "coronal": ("R", "S"), "sagittal": ("A", "S")}[view] == (horizontal, vertical)
        if view in ("axial", "coronal"):
            assert cols < 0.5 and (left, right) == ("R", "L")


def test_overlay_legend_names_the_structures_shown_in_colours_that_tell_neighbours_apart():
    from matplotlib.colors import rgb_to_hsv

    truth, pred = np.array([[0, 2], [3, 3]]), np.array([[0, 13], [2, 0]])
    names = {0: "background", 2: "right kidney", 3: "left kidney"}
    assert overlays.legend_entries(truth, pred, names) == [(2, "right kidney"), (3, "left kidney"), (13, "label 13")]
    hues = rgb_to_hsv(overlays.label_colours(14)[1:, :3])[:, 0]
    assert np.abs(np.diff(hues)).min() > 0.04  # consecutive labels (kidneys, adrenals) differ in hue
    saver = overlays.SegmentationOverlaySaver("/unused", 14, label_names={"0": "background", "1": "spleen"})
    assert saver.names == {0: "background", 1: "spleen"}


# --- data lists -------------------------------------------------------------------------------------------------
def test_folder_pairs_and_split(small_btcv):
    split = datalist.build_datalist(small_btcv, val_fraction=0.2)
    assert [os.path.basename(p["image"]) for p in split["training"]] == [f"img000{i}.nii.gz" for i in range(1, 5)]
    assert [os.path.basename(p["label"]) for p in split["validation"]] == ["label0005.nii.gz"]
    assert len(datalist.build_datalist(small_btcv, val_fraction=0.4)["validation"]) == 2


def test_datalist_json_with_validation(small_btcv, tmp_path):
    spec = {
        "training": [{"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}],
        "validation": [{"image": "imagesTr/img0002.nii.gz", "label": "labelsTr/label0002.nii.gz"}],
    }
    path = tmp_path / "split.json"
    path.write_text(json.dumps(spec))
    split = datalist.build_datalist(small_btcv, str(path))
    assert split["training"][0]["image"] == os.path.join(small_btcv, "imagesTr", "img0001.nii.gz")
    assert split["validation"][0]["label"] == os.path.join(small_btcv, "labelsTr", "label0002.nii.gz")


def test_datalist_json_without_validation_is_split(small_btcv, tmp_path):
    items = [{"image": f"imagesTr/img000{i}.nii.gz", "label": f"labelsTr/label000{i}.nii.gz"} for i in range(1, 6)]
    path = tmp_path / "train_only.json"
    path.write_text(json.dumps({"training": items}))
    split = datalist.build_datalist(small_btcv, str(path), val_fraction=0.4)
    assert len(split["training"]) == 3 and len(split["validation"]) == 2


def test_num_train_cases_keeps_the_first_training_cases_and_all_validation(small_btcv):
    every = datalist.build_datalist(small_btcv, val_fraction=0.4)
    fewer = datalist.build_datalist(small_btcv, val_fraction=0.4, num_train_cases=2)
    assert fewer["training"] == every["training"][:2] and len(every["training"]) == 3
    assert fewer["validation"] == every["validation"]
    assert datalist.build_datalist(small_btcv, val_fraction=0.4, num_train_cases=None) == every


@pytest.mark.parametrize("value, message", [
    (0, "num_train_cases must be a positive whole number or None (all cases), got 0."),
    (True, "num_train_cases must be a positive whole number or None (all cases), got True."),
    ("2", "num_train_cases must be a positive whole number or None (all cases), got '2'."),
    (4, "num_train_cases is 4 but the training split holds only 3 cases."),
])  # fmt: skip
def test_num_train_cases_out_of_range_is_named(small_btcv, value, message):
    with pytest.raises(ValueError) as error:
        datalist.build_datalist(small_btcv, val_fraction=0.4, num_train_cases=value)
    assert str(error.value) == message


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset_dir '.*nowhere' does not exist"):
        datalist.build_datalist(str(tmp_path / "nowhere"))


def test_empty_images_folder(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(FileNotFoundError, match="imagesTr holds no NIfTI images"):
        datalist.build_datalist(str(tmp_path))


def test_folder_without_imagesTr(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no imagesTr folder"):
        datalist.build_datalist(str(tmp_path))


def test_images_without_labels_are_named(small_btcv):
    os.remove(os.path.join(small_btcv, "labelsTr", "label0003.nii.gz"))
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) in imagesTr have no label in labelsTr: img0003.nii.gz"):
        datalist.build_datalist(small_btcv)


def test_label_values_above_13_are_refused(small_btcv):
    path = os.path.join(small_btcv, "labelsTr", "label0002.nii.gz")
    label = nib.load(path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 17
    nib.save(nib.Nifti1Image(data, label.affine), path)
    with pytest.raises(ValueError, match=r"label0002.nii.gz' holds values \[17\] outside 0..13"):
        datalist.build_datalist(small_btcv)


def test_label_shape_mismatch_is_refused(small_btcv):
    path = os.path.join(small_btcv, "labelsTr", "label0001.nii.gz")
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:-1], label.affine), path)
    with pytest.raises(ValueError, match="label0001.nii.gz' has shape"):
        datalist.build_datalist(small_btcv)


def test_single_case_cannot_be_split(tmp_path):
    synthetic_ct.generate(str(tmp_path), num_train=1, num_test=0, shape=(48, 44, 12))
    with pytest.raises(ValueError, match="at least 2 labelled cases"):
        datalist.build_datalist(str(tmp_path))


def test_list_images_finds_nifti_and_dicom_series(small_btcv):
    image, _, affine = synthetic_ct.make_case(seed=9, shape=(48, 44, 6))
    synthetic_ct.write_dicom_series(image, affine, os.path.join(small_btcv, "imagesTs", "series"))
    found = [os.path.basename(d["image"]) for d in datalist.list_images(small_btcv)]
    assert found == ["img0006.nii.gz", "series"]
    single = os.path.join(small_btcv, "imagesTs", "img0006.nii.gz")
    assert datalist.list_images(single) == [{"image": single}]


def test_list_images_finds_dicom_in_the_layouts_users_have(tmp_path):
    """DICOM by content: extension-less files (PACS exports), `dataset_dir` as the series folder or as one of its
    files, and DICOM files loose beside NIfTI images (the folder is then one series)."""
    image, _, affine = synthetic_ct.make_case(seed=9, shape=(40, 36, 5))
    series = tmp_path / "export" / "1.2.840.99"
    synthetic_ct.write_dicom_series(image, affine, str(series), suffix="")
    assert datalist.list_images(str(tmp_path / "export")) == [{"image": str(series)}]
    assert datalist.list_images(str(series)) == [{"image": str(series)}]
    assert datalist.list_images(str(series / "slice_0002")) == [{"image": str(series)}]
    loose = tmp_path / "loose"
    synthetic_ct.write_dicom_series(image, affine, str(loose))
    synthetic_ct.save_nifti(image, affine, str(loose / "case.nii.gz"))
    assert datalist.list_images(str(loose)) == [{"image": str(loose)}, {"image": str(loose / "case.nii.gz")}]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("no image here " * 20)
    with pytest.raises(ValueError, match="notes.txt' is a file but neither NIfTI"):
        datalist.list_images(str(not_an_image))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme").write_text("no images")
    with pytest.raises(FileNotFoundError, match="holds no NIfTI images .*, DICOM files or DICOM series folders"):
        datalist.list_images(str(tmp_path / "empty"))


def test_a_dicom_series_without_extensions_reads_like_the_nifti(tmp_path):
    from monai.transforms import LoadImage

    image, _, affine = synthetic_ct.make_case(seed=9, shape=(40, 36, 5))
    synthetic_ct.write_dicom_series(image, affine, str(tmp_path / "series"), suffix="")
    for reader in ("ITKReader", "PydicomReader"):
        read = LoadImage(image_only=True, reader=reader)(datalist.list_images(str(tmp_path / "series"))[0]["image"])
        np.testing.assert_array_equal(read.numpy(), image, err_msg=reader)


def test_dicom_seg_references_the_series_and_matches_the_label_map(tmp_path, caplog):
    """A label map in the space the series was read in becomes a DICOM SEG whose segments are the organs present
    (metadata names, SNOMED codes where known, the pictures' colours), each frame on its source image."""
    import highdicom as hd
    from monai.transforms import LoadImage

    image, label, affine = synthetic_ct.make_case(seed=3, shape=(48, 40, 6))
    series = tmp_path / "series"
    synthetic_ct.write_dicom_series(image, affine, str(series), suffix="")
    read = LoadImage(image_only=True)(str(series))
    names = json.loads((BTCV / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]
    writer = dicom_seg.SaveDicomSegd("pred", str(tmp_path / "out"), str(BTCV / "configs" / "metadata.json"))
    writer({"pred": MetaTensor(torch.as_tensor(label[None]), meta=dict(read.meta))})
    segment_labels, numbers, seg, sources = read_back_dicom_seg(tmp_path / "out" / "series_seg.dcm", series)
    present = [int(v) for v in np.unique(label) if v > 0]
    assert segment_labels == [names["channel_def"][str(v)] for v in present]
    expected = np.stack([label[:, :, k].T for k in range(label.shape[2])])  # the writer's slice k, rows x columns
    np.testing.assert_array_equal(np.array([0] + present)[numbers], expected)
    kidney = seg.get_segment_description(segment_labels.index("right kidney") + 1)
    assert kidney.segmented_property_type.value == "64033007"  # SNOMED CT kidney
    colour = overlays.label_colours(14)[2][:3] * 255
    shown = hd.color.CIELabColor.from_dicom_value(kidney.RecommendedDisplayCIELabValue).to_rgb()
    np.testing.assert_allclose(shown, colour, atol=2)
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID and seg.Modality == "SEG"

    nifti = tmp_path / "case.nii.gz"
    synthetic_ct.save_nifti(image, affine, str(nifti))
    with caplog.at_level("INFO"):
        writer({"pred": MetaTensor(torch.as_tensor(label[None]), meta={"filename_or_obj": str(nifti)})})
    assert "no DICOM SEG for case.nii.gz: its input is not DICOM" in caplog.text
    shifted = dict(read.meta, affine=read.affine @ torch.tensor(np.diag([1.0, 1.0, 2.0, 1.0])))
    with pytest.raises(ValueError, match="the prediction's grid .* does not match DICOM image"):
        writer({"pred": MetaTensor(torch.as_tensor(label[None]), meta=shifted)})
    synthetic_ct.write_dicom_series(image, affine, str(series / "other"))
    shutil.move(str(series / "other" / "slice_0000.dcm"), str(series / "stray.dcm"))
    with pytest.raises(ValueError, match="holds 2 DICOM series; a DICOM SEG references one"):
        dicom_seg.source_images(str(series))


def test_dicom_seg_without_highdicom_stops_at_start_naming_the_setting(monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed
    with pytest.raises(ImportError, match="write_dicom_seg needs the highdicom package: pip install highdicom"):
        dicom_seg.SaveDicomSegd("pred", "out", str(BTCV / "configs" / "metadata.json"))


# --- settings checks --------------------------------------------------------------------------------------------
def test_roi_size_must_be_divisible_by_32():
    assert checks.check_roi_size([96, 96, 64]) == [96, 96, 64]
    with pytest.raises(ValueError, match=r"roi_size=\[96, 80, 96\] is not divisible by 32.*\[96, 96, 96\]"):
        checks.check_roi_size([96, 80, 96])
    with pytest.raises(ValueError, match="must be 3 positive integers"):
        checks.check_roi_size([96, 96])


def test_flags_must_be_bools_not_command_line_text():
    assert checks.check_flags(amp=False, resume=True) == {"amp": False, "resume": True}
    with pytest.raises(
        ValueError, match=r"^amp must be True or False, got 'false': .* write --amp False \(capitalised"
    ):
        checks.check_flags(resume=True, amp="false")
    with pytest.raises(
        ValueError, match=r"use_checkpoint must be True or False, got 'true': .* --use_checkpoint True "
    ):
        checks.check_flags(use_checkpoint="true")


# --- resume -----------------------------------------------------------------------------------------------------
def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    for name in ["checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "model.pt"]:
        torch.save({"name": torch.tensor(1)}, tmp_path / name)
    assert checkpoints.latest_checkpoint(str(tmp_path)).endswith("checkpoint_epoch=10.pt")
    shutil.rmtree(tmp_path)
    with pytest.raises(FileNotFoundError, match="resume=true but ckpt_dir"):
        checkpoints.latest_checkpoint(str(tmp_path))


# --- metrics in millimetres -------------------------------------------------------------------------------------
def test_hausdorff_uses_spacing_from_affine():
    pred = torch.zeros(1, 2, 16, 16, 16)
    target = torch.zeros(1, 2, 16, 16, 16)
    pred[:, 1, 4:8, 4:8, 4:8] = 1
    target[:, 1, 4:8, 4:8, 6:10] = 1  # shifted by 2 voxels along the last axis
    pred[:, 0], target[:, 0] = 1 - pred[:, 1], 1 - target[:, 1]
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0]))
    in_voxels = HausdorffDistanceMetric(include_background=False)(pred, target)
    in_mm = metrics.HausdorffDistanceMM(include_background=False)(pred, MetaTensor(target, affine=affine))
    assert in_voxels.item() == pytest.approx(2.0)
    assert in_mm.item() == pytest.approx(5.0)


def test_surface_dice_tolerance_in_mm():
    pred = torch.zeros(1, 2, 16, 16, 16)
    target = torch.zeros(1, 2, 16, 16, 16)
    pred[:, 1, 4:10, 4:10, 4:10] = 1
    target[:, 1, 4:10, 4:10, 5:11] = 1  # one voxel = 2.5 mm along the last axis
    pred[:, 0], target[:, 0] = 1 - pred[:, 1], 1 - target[:, 1]
    affine = torch.diag(torch.tensor([1.0, 1.0, 2.5, 1.0]))
    strict = metrics.SurfaceDiceMM(class_thresholds=[1.0], include_background=False)
    loose = metrics.SurfaceDiceMM(class_thresholds=[3.0], include_background=False)
    assert strict(pred, MetaTensor(target, affine=affine)).item() < 0.9
    assert loose(pred, MetaTensor(target, affine=affine)).item() == pytest.approx(1.0)


# --- pretrained encoder -----------------------------------------------------------------------------------------
def _encoder_file(path, feature_size=12, seed=0):
    torch.manual_seed(seed)
    source = SwinUNETR(1, 14, feature_size=feature_size)
    write_encoder_file(source, path)
    return source


def test_encoder_file_keys_match_released_layout():
    keys = [pretrained.file_key(k) for k in SwinUNETR(1, 14, feature_size=12).state_dict() if k.startswith("swinViT.")]
    assert "module.patch_embed.proj.weight" in keys
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in keys
    assert not any(k.startswith("swinViT") or ".linear1." in k for k in keys)


def test_load_encoder_copies_every_encoder_tensor(tmp_path):
    source = _encoder_file(tmp_path / "enc.pt")
    torch.manual_seed(1)
    target = SwinUNETR(1, 14, feature_size=12)
    decoder_before = target.out.conv.conv.weight.clone()
    loaded = pretrained.load_encoder(target, str(tmp_path / "enc.pt"))
    encoder = {k: v for k, v in source.state_dict().items() if k.startswith("swinViT.")}
    assert loaded == len(encoder)
    for key, value in encoder.items():
        torch.testing.assert_close(target.state_dict()[key], value)
    torch.testing.assert_close(target.out.conv.conv.weight, decoder_before)


def test_load_encoder_agrees_with_swinunetr_load_from(tmp_path):
    _encoder_file(tmp_path / "enc.pt")
    ours, theirs = SwinUNETR(1, 14, feature_size=12), SwinUNETR(1, 14, feature_size=12)
    pretrained.load_encoder(ours, str(tmp_path / "enc.pt"))
    theirs.load_from(torch.load(tmp_path / "enc.pt", weights_only=True))
    for key, value in theirs.swinViT.state_dict().items():
        torch.testing.assert_close(ours.swinViT.state_dict()[key], value)


def test_load_encoder_refuses_wrong_feature_size(tmp_path):
    _encoder_file(tmp_path / "enc24.pt", feature_size=24)
    target = SwinUNETR(1, 14, feature_size=12)
    before = target.swinViT.patch_embed.proj.weight.clone()
    with pytest.raises(ValueError, match=r"enc24.pt' does not match the network: 'module.patch_embed.proj.weight'"):
        pretrained.load_encoder(target, str(tmp_path / "enc24.pt"))
    torch.testing.assert_close(target.swinViT.patch_embed.proj.weight, before)


def test_load_encoder_refuses_non_encoder_file(tmp_path):
    torch.save(SwinUNETR(1, 14, feature_size=12).state_dict(), tmp_path / "whole_model.pt")
    with pytest.raises(ValueError, match="is not a Swin UNETR encoder file"):
        pretrained.load_encoder(SwinUNETR(1, 14, feature_size=12), str(tmp_path / "whole_model.pt"))
    with pytest.raises(FileNotFoundError, match="pretrained_path .* does not exist"):
        pretrained.load_encoder(SwinUNETR(1, 14, feature_size=12), str(tmp_path / "missing.pt"))


# --- atomic NIfTI output ----------------------------------------------------------------------------------------
def test_writer_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    from scripts import image_writer

    target = tmp_path / "case_seg.nii.gz"
    writer = image_writer.AtomicNibabelWriter(output_dtype=np.uint8)
    writer.set_data_array(torch.ones(1, 4, 4, 4), channel_dim=0)
    writer.set_metadata({"affine": np.eye(4)}, resample=False)
    writer.write(str(target))
    assert nib.load(target).shape == (4, 4, 4) and list(tmp_path.iterdir()) == [target]

    def crash(img, filename):
        with open(filename, "wb") as f:
            f.write(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", crash)
    writer.set_data_array(torch.ones(1, 4, 4, 4), channel_dim=0)  # a writer holds one image per write
    with pytest.raises(OSError, match="disk full"):
        writer.write(str(tmp_path / "other_seg.nii.gz"))
    assert list(tmp_path.iterdir()) == [target]  # neither the final name nor the partial file remains


class _RecordsPrecision(torch.nn.Module):
    """A conv network returning a dict, as the pre-training head does; records the autocast state it ran under."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.seen: list = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        y = self.conv(x)
        return {"pred": y, "dtype_inside": str(y.dtype), "index": torch.argmax(y, dim=1)}


def test_autocast_inferer_runs_bfloat16_and_returns_float32(monkeypatch):
    from monai.inferers import SimpleInferer

    monkeypatch.setattr(mixed_precision, "cpu_has_native_bfloat16", lambda: True)
    net, x = _RecordsPrecision(), torch.rand(1, 1, 8, 8, 8)
    out = mixed_precision.AutocastInferer(SimpleInferer(), enabled=True)(x, net)
    assert net.seen == [(True, torch.bfloat16)] and out["dtype_inside"] == "torch.bfloat16"
    assert out["pred"].dtype == torch.float32 and out["index"].dtype == torch.int64  # integers left alone
    reference = SimpleInferer()(x, net)["pred"]
    assert not torch.equal(out["pred"], reference)  # really computed in bfloat16 ...
    torch.testing.assert_close(out["pred"], reference, atol=2e-2, rtol=2e-2)  # ... and close to float32
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the call


@pytest.mark.parametrize("enabled, native", [(False, True), (True, False)])
def test_autocast_inferer_is_plain_float32_when_off_or_unsupported(monkeypatch, caplog, enabled, native):
    from monai.inferers import SimpleInferer

    monkeypatch.setattr(mixed_precision, "cpu_has_native_bfloat16", lambda: native)
    net, x = _RecordsPrecision(), torch.rand(1, 1, 8, 8, 8)
    with caplog.at_level("INFO"):
        inferer = mixed_precision.AutocastInferer(SimpleInferer(), enabled=enabled)
    assert inferer.enabled is False
    assert ("no native bfloat16" in caplog.text) is (enabled and not native)
    out = inferer(x, net)
    assert net.seen[-1][0] is False and out["dtype_inside"] == "torch.float32"
    assert torch.equal(out["pred"], SimpleInferer()(x, net)["pred"])


class _Bottleneck(torch.nn.Module):
    """A convolution on the full input, then one on 2x2x2 voxels like SwinUNETR's bottleneck at a 64^3 patch."""

    def __init__(self) -> None:
        super().__init__()
        self.large = torch.nn.Conv3d(1, 48, 3, padding=1)
        self.small = torch.nn.Conv3d(48, 48, 3, padding=1)

    def forward(self, x):
        return self.small(torch.nn.functional.adaptive_avg_pool3d(self.large(x), 2))


def test_autocast_inferer_keeps_convolutions_on_few_voxels_in_float32(monkeypatch):
    from monai.inferers import SimpleInferer

    monkeypatch.setattr(mixed_precision, "cpu_has_native_bfloat16", lambda: True)
    net, dtypes = _Bottleneck(), {}
    for name in ("large", "small"):
        getattr(net, name).register_forward_hook(lambda m, args, out, name=name: dtypes.update({name: out.dtype}))
    mixed_precision.AutocastInferer(SimpleInferer(), enabled=True)(torch.rand(1, 1, 8, 8, 8), net)
    assert dtypes == {"large": torch.bfloat16, "small": torch.float32}
    assert not torch.is_autocast_enabled("cpu")
    # the inferer's hooks are gone after the call: only the test's own remain
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in (net.large, net.small)] == [1, 1]


def test_bfloat16_weight_gradients_on_few_voxels_stay_finite(monkeypatch):
    """Replays what turned tiny bfloat16 trainings NaN: a convolution on 2x2x2 voxels after memory holding NaN was
    freed. oneDNN's bfloat16 backward read it uninitialised; unguarded, most such steps gave NaN weight gradients
    here (torch 2.13 CPU)."""
    from monai.inferers import SimpleInferer

    monkeypatch.setattr(mixed_precision, "cpu_has_native_bfloat16", lambda: True)
    torch.manual_seed(0)
    net, inferer = torch.nn.Conv3d(48, 48, 3, padding=1), mixed_precision.AutocastInferer(SimpleInferer(), enabled=True)
    for _ in range(20):
        junk = [torch.full((n,), float("nan")) for n in (1000, 20000, 300000, 3000000)]
        del junk
        net.zero_grad(set_to_none=True)
        (inferer(torch.randn(1, 48, 2, 2, 2), net) * torch.randn(1, 48, 2, 2, 2) * 1e-3).sum().backward()
        assert torch.isfinite(net.weight.grad).all()


# --- patches a few at a time -----------------------------------------------------------------------------------
def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _train_one_batch(net, batch, iteration_update=None, amp=False, cuda_amp=False, decollate=True, lr=1e-4):
    """One iteration of MONAI's SupervisedTrainer (AdamW, DiceCE, an LR scheduler wrapping the optimizer's step)
    with gradients left over from an earlier step; returns the trainer, its optimizer and the forward passes' sizes."""
    from monai.engines import SupervisedTrainer
    from monai.inferers import SimpleInferer
    from monai.losses import DiceCELoss

    passes: list = []
    hook = net.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    for weight in net.parameters():
        weight.grad = torch.ones_like(weight)  # must not leak into this step
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], epoch_length=1, network=net, optimizer=optimizer,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True), iteration_update=iteration_update,
        inferer=mixed_precision.AutocastInferer(SimpleInferer(), enabled=amp), amp=cuda_amp, decollate=decollate,
    )  # fmt: skip
    trainer.run()
    hook.remove()
    return trainer, optimizer, passes


_FLOAT64_GRADIENTS: list = []


@pytest.mark.parametrize("amp, decollate", [(False, True), (False, False), (True, True)])
def test_patchwise_iteration_gives_the_whole_batch_loss_and_gradients(amp, decollate):
    """Two 64x64x32 patches one at a time against MONAI's iteration over both (float32, and bfloat16
    autocast where the CPU has it): one forward pass per patch, one optimizer step, the batch's loss and gradients,
    and the engine's state as after one pass."""
    torch.manual_seed(0)
    x = MetaTensor(torch.rand(2, 1, 64, 64, 32))
    batch = {"image": x, "label": MetaTensor(torch.randint(0, 14, (2, 1, 64, 64, 32)).float()), "name": ["a", "b"]}
    start = SwinUNETR(1, 14, feature_size=12, use_checkpoint=True).state_dict()
    if amp and not mixed_precision.cpu_has_native_bfloat16():
        pytest.skip("no native bfloat16 on this CPU: amp trains in float32, which the [False-True] case runs")
    runs = {}
    # the float64 reference is the same for every case (same seeded inputs, no autocast): computed once
    reference = [("float64", None, False, torch.float64)] if not _FLOAT64_GRADIENTS else []
    for name, update, autocast, dtype in [("whole", None, amp, torch.float32),
                                          ("patchwise", patchwise.PatchwiseIteration(1), amp, torch.float32),
                                          *reference]:  # fmt: skip
        # the reference needs no recomputation in the backward pass (same parameters, same gradients)
        net = SwinUNETR(1, 14, feature_size=12, use_checkpoint=dtype != torch.float64).to(dtype)
        net.load_state_dict(start)
        data = dict(batch, image=MetaTensor(x.as_tensor().to(dtype)))
        runs[name] = (*_train_one_batch(net, data, update, amp=autocast, decollate=decollate), net)
    (whole, _, passes_a, net_a), (trainer, optimizer, passes_b, net_b) = runs["whole"], runs["patchwise"]
    assert passes_a == [2] and passes_b == [1, 1]  # one pass per patch, nothing recomputed
    assert {int(state["step"]) for state in optimizer.state.values()} == {1}  # one optimizer step
    assert "step" in vars(optimizer) and "zero_grad" not in vars(optimizer)  # the scheduler's wrapper is back
    assert isinstance(trainer.loss_function, torch.nn.Module)
    output, batch_after = trainer.state.output, trainer.state.batch
    if decollate:
        assert [item["image"].shape for item in output] == [(1, 64, 64, 32)] * 2 and len(batch_after) == 2
        assert [item["name"] for item in batch_after] == ["a", "b"]
        losses = [item["loss"] for item in output], [item["loss"] for item in whole.state.output]
        assert len(set(losses[0])) == 1
        loss_b, loss_a = losses[0][0], losses[1][0]
    else:
        assert output["pred"].shape == (2, 14, 64, 64, 32) and not output["pred"].requires_grad
        torch.testing.assert_close(output["image"], x)
        assert batch_after["name"] == ["a", "b"]
        loss_b, loss_a = float(output["loss"]), float(whole.state.output["loss"].detach())
    assert loss_b == pytest.approx(loss_a, rel=1e-5 if not amp else 1e-2)
    if reference:
        _FLOAT64_GRADIENTS.extend(w.grad for w in runs["float64"][3].parameters())
    exact = _FLOAT64_GRADIENTS
    errors = [(_relative(a.grad.double(), e), _relative(b.grad.double(), e))
              for a, b, e in zip(net_a.parameters(), net_b.parameters(), exact)]  # fmt: skip
    assert all(e.abs().max() > 0 for e in exact)
    # One pass over two patches and two passes over one round differently. In float32 both must stay within float32
    # rounding of float64 (largest for the first stage's norms, whose gradients cancel: up to 1.0e-2 seen); which of
    # the two is closer depends on the kernels the CPU gets for 1 patch and for several (measured with 3: on an Intel
    # Xeon with AMX the one-patch pass was ~3x further off, on AMD Zen 4 ~3x closer), so only the bound is asserted; a
    # wrong weighting of the patches' losses would be off by tens of percent. bfloat16 gradients of an untrained
    # network are 17-38% off float64 for single first-stage parameters either way, so there the sum over all
    # parameters compares.
    whole_errors, patchwise_errors = zip(*errors)
    if amp:
        assert sum(patchwise_errors) < 1.1 * sum(whole_errors)
    else:
        assert max(whole_errors) < 2e-2 and max(patchwise_errors) < 2e-2, (max(whole_errors), max(patchwise_errors))


class _RecordingNet(torch.nn.Conv3d):
    """A one-layer network with DDP's `no_sync`, recording which forward passes ran inside it."""

    def __init__(self) -> None:
        super().__init__(1, 2, 3, padding=1)
        self.syncing, self.passes = True, []

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        yield
        self.syncing = True

    def forward(self, x):
        self.passes.append((x.shape[0], self.syncing))
        return super().forward(x)


def test_patchwise_iteration_runs_small_batches_whole_and_refuses_wrong_sizes():
    def passes(size: int, batch_size: int, **kwargs) -> list:
        torch.manual_seed(0)
        net = _RecordingNet()
        batch = {"image": torch.rand(batch_size, 1, 8, 8, 8), "label": torch.randint(0, 2, (batch_size, 1, 8, 8, 8))}
        _train_one_batch(net, batch, patchwise.PatchwiseIteration(size), **kwargs)
        return net.passes

    # gradients are synchronised across processes once a step, with the last part
    assert passes(2, 5) == [(2, False), (2, False), (1, True)]
    assert passes(2, 2) == [(2, True)] and passes(None, 5) == [(5, True)]  # nothing to split
    for wrong in (0, -1, 1.5, "1", True):
        with pytest.raises(ValueError, match=r"^cpu_patches_per_pass must be a whole number of 1 or more, or null"):
            patchwise.PatchwiseIteration(wrong)


def test_patchwise_iteration_unscales_and_steps_once_under_cuda_amp():
    """With MONAI's CUDA AMP the gradient scaler must step and update once, after the last part (here on a CPU,
    where the scaler is disabled but still called)."""
    calls: list = []
    step, update = torch.amp.GradScaler.step, torch.amp.GradScaler.update

    def counting_step(self, *args, **kwargs):
        calls.append("step")
        return step(self, *args, **kwargs)

    def counting_update(self, *args, **kwargs):
        calls.append("update")
        return update(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDA autocast and scaler on a machine without CUDA
        patch.setattr(torch.amp.GradScaler, "step", counting_step)
        patch.setattr(torch.amp.GradScaler, "update", counting_update)
        net = _RecordingNet()
        batch = {"image": torch.rand(3, 1, 8, 8, 8), "label": torch.randint(0, 2, (3, 1, 8, 8, 8))}
        trainer, optimizer, _ = _train_one_batch(net, batch, patchwise.PatchwiseIteration(1), cuda_amp=True)
    assert trainer.scaler is not None and not vars(trainer.scaler).keys() & {"step", "update"}
    assert calls == ["step", "update"]
    assert {int(state["step"]) for state in optimizer.state.values()} == {1}


def test_group_norm_kernel_gives_the_instance_norms_outputs():
    """The swapped network keeps its parameters and gives the same float32 outputs; norms it cannot stand for stay."""
    torch.manual_seed(0)
    net = SwinUNETR(1, 14, feature_size=12).eval()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(1, 1, 64, 64, 64) * 4 - 1  # not zero-mean, as CT intensities after windowing are not
    with torch.no_grad():
        before = net(x).double()
        norms = sum(type(m) is torch.nn.InstanceNorm3d for m in net.modules())
        assert fast_norm.use_fast_norm(net) is net
        after = net(x).double()
    assert norms > 0 and sum(type(m) is fast_norm.FastInstanceNorm3d for m in net.modules()) == norms
    assert not any(type(m) is torch.nn.InstanceNorm3d for m in net.modules())
    assert net.state_dict().keys() == original.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in original.items())
    assert (after - before).abs().max() < 1e-5 and (after.argmax(1) == before.argmax(1)).double().mean() > 0.9999

    layers = (torch.nn.InstanceNorm3d(3, affine=True), torch.nn.InstanceNorm3d(3, track_running_stats=True))
    affine = torch.nn.Sequential(*layers)
    torch.nn.init.normal_(affine[0].weight)
    torch.nn.init.normal_(affine[0].bias)
    y = torch.rand(2, 3, 5, 6, 7) + 2
    expected = affine(y)
    fast_norm.use_fast_norm(affine)
    assert [type(m) for m in affine] == [fast_norm.FastInstanceNorm3d, torch.nn.InstanceNorm3d]
    torch.testing.assert_close(affine(y), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        affine[0](y[0]),
        torch.nn.functional.instance_norm(  # unbatched input
            y[0][None], weight=affine[0].weight, bias=affine[0].bias
        )[0],
        atol=1e-5,
        rtol=1e-5,
    )
    untouched = torch.nn.Sequential(torch.nn.InstanceNorm3d(3))
    assert type(fast_norm.use_fast_norm(untouched, enabled=False)[0]) is torch.nn.InstanceNorm3d


@pytest.mark.parametrize("affine", [True, False])
def test_channels_last_maps_are_normalised_as_in_float64(affine):
    """Channels-last maps (`cpu_channels_last`) get two-pass statistics per depth slice: channels far from zero mean
    against their spread (as after a convolution with a large bias) and slices of different spread, batch of 2."""
    torch.manual_seed(0)
    norm = fast_norm.FastInstanceNorm3d(4, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 4, 48, 64, 64) * torch.tensor([1.0, 0.1, 3.0, 1.0]).view(1, 4, 1, 1, 1)
    x = x + torch.tensor([200.0, -20.0, 0.0, 1.0]).view(1, 4, 1, 1, 1)
    x[:, :, :5] *= 4
    expected = torch.nn.functional.instance_norm(
        x.double(), weight=norm.weight.double() if affine else None, bias=norm.bias.double() if affine else None
    )
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        out = norm(channels_last)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()
    assert (out.double() - expected).abs().max() < 2e-5
    with torch.no_grad():  # PyTorch's own channels-last kernel, which this path stands in for, is far off here
        kernel = torch.nn.functional.group_norm(channels_last, 4, norm.weight, norm.bias)
    assert (kernel.double() - expected).abs().max() > 2e-4  # measured: 9e-4 and 1.4e-3 (this path: 1e-6, 3.5e-6)
    with torch.no_grad():  # opt-in bfloat16 inference: float32 statistics, as PyTorch's kernel keeps them
        half, half_kernel = (
            norm(channels_last.bfloat16()),
            torch.nn.functional.group_norm(
                x.bfloat16(),
                4,
                None if norm.weight is None else norm.weight.bfloat16(),
                None if norm.bias is None else norm.bias.bfloat16(),
            ),
        )
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last_3d)
    assert (half.double() - expected).abs().max() <= 1.05 * (half_kernel.double() - expected).abs().max()
    with_grad = channels_last.clone().requires_grad_()  # training: MONAI's instance norm, with gradients
    out = norm(with_grad)
    out.square().sum().backward()
    assert (out.double() - expected).abs().max() < 2e-5 and with_grad.grad.abs().sum() > 0


def _up_block(in_channels: int, out_channels: int, res_block: bool = True) -> torch.nn.Module:
    """A MONAI `UnetrUpBlock` as SwinUNETR builds them, in float64 with weights far from their initial scale."""
    from monai.networks.blocks import UnetrUpBlock

    block = UnetrUpBlock(3, in_channels, out_channels, 3, 2, "instance", res_block=res_block).double().eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter)
    return block


def _autograd_nodes(tensor: torch.Tensor) -> collections.Counter:
    """How many autograd functions of each kind computed `tensor`."""
    counts, pending, seen = collections.Counter(), [tensor.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] += 1
        pending.extend(parent for parent, _ in node.next_functions)
    return counts


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_upsampling_gives_the_up_blocks_outputs(channels_last):
    """`cpu_fused_upsampling`: the folded transposed convolution gives MONAI's `UnetrUpBlock` outputs, and in training
    its gradients for the inputs and every weight (float64, odd and uneven sizes, batch of 2, more and fewer input than
    output channels)."""
    import copy

    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    for in_channels, out_channels, size in ((6, 6, (5, 3, 4)), (4, 6, (3, 4, 2)), (10, 6, (2, 2, 3))):
        block = _up_block(in_channels, out_channels)
        fused = fused_upsampling.fuse_upsampling(copy.deepcopy(block))
        assert type(fused) is fused_upsampling.FusedUnetrUpBlock
        assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), block.state_dict().values()))
        x = torch.randn(2, in_channels, *size, dtype=torch.float64).contiguous(memory_format=layout)
        skip = torch.randn(2, out_channels, *(2 * s for s in size), dtype=torch.float64).contiguous(
            memory_format=layout
        )
        with torch.no_grad():
            expected, out = block(x, skip), fused(x, skip)
        assert out.shape == expected.shape == skip.shape
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        gradients = []
        for module in (block, fused):
            module.zero_grad()
            inputs = [x.clone().requires_grad_(), skip.clone().requires_grad_()]
            out = module(*inputs)
            (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            gradients.append([t.grad for t in inputs] + [p.grad for p in module.parameters()])
            assert all(g is not None and g.abs().sum() > 0 for g in gradients[-1])
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        for expected_grad, grad in zip(*gradients):
            torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=1e-9)
        fused, block = fused.float(), block.float()  # the folded path really ran: it rounds differently in float32
        with_grad, monai_with_grad = fused(x.float(), skip.float()), block(x.float(), skip.float())
        assert not torch.equal(with_grad, monai_with_grad)
        # no in-place writes into views beyond MONAI's own: each one's backward copies the full-resolution gradient
        assert _autograd_nodes(with_grad)["CopySlices"] == _autograd_nodes(monai_with_grad)["CopySlices"] > 0
        with torch.no_grad():
            assert not torch.equal(fused(x.float(), skip.float()), block(x.float(), skip.float()))


def test_fused_upsampling_folds_only_blocks_where_it_pays():
    """In SwinUNETR only `decoder1` (as many input as output channels); its other decoder blocks, blocks with a bias,
    dropout or without the residual convolution, and `enabled=False` leave MONAI's blocks as they are."""
    import copy

    torch.manual_seed(0)
    net = SwinUNETR(1, 14, feature_size=12).eval()
    reference = copy.deepcopy(net)
    assert fused_upsampling.fuse_upsampling(net) is net and list(net.state_dict()) == list(reference.state_dict())
    fused = [name for name, m in net.named_modules() if type(m) is fused_upsampling.FusedUnetrUpBlock]
    assert fused == ["decoder1"]
    assert type(fused_upsampling.fuse_upsampling(_up_block(6, 6), enabled=False)).__name__ == "UnetrUpBlock"
    biased, dropout = _up_block(6, 6), _up_block(6, 6)
    biased.transp_conv.conv = torch.nn.ConvTranspose3d(6, 6, 2, stride=2)
    dropout.conv_block.conv1.add_module("dropout", torch.nn.Dropout3d())
    for block in (_up_block(12, 6), _up_block(6, 6, res_block=False), biased, dropout):
        assert type(fused_upsampling.fuse_upsampling(block)).__name__ == "UnetrUpBlock"
    x = torch.rand(1, 1, 64, 64, 64) * 4 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), atol=1e-5, rtol=1e-5)


def _input_block(out_channels: int, affine: bool = False) -> torch.nn.Module:
    """SwinUNETR's `encoder1` for a single-channel image, weights far from their initial scale."""
    from monai.networks.blocks import UnetrBasicBlock

    norm = ("instance", {"affine": affine})
    block = UnetrBasicBlock(3, 1, out_channels, 3, 1, norm, res_block=True).eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter)
    return block


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_input_block_gives_the_basic_blocks_outputs(channels_last, affine):
    """`cpu_fused_input_block`: the closed-form residual norm gives MONAI's `UnetrBasicBlock` outputs (float32 against
    float64, images far from zero mean, batch of 2, one residual weight zero) in the layout MONAI's block returns;
    training and bfloat16 autocast run MONAI's forward."""
    import copy

    torch.manual_seed(0)
    block = _input_block(6, affine)
    with torch.no_grad():
        block.layer.conv3.conv.weight[2] = 0  # a channel the residual branch leaves at zero
    if channels_last:
        fast_norm.use_fast_norm(block)
        block = block.to(memory_format=torch.channels_last_3d)
    fused = fused_input_block.fuse_input_block(copy.deepcopy(block))
    assert type(fused) is fused_input_block.FusedInputBlock
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), block.state_dict().values()))
    spread, offset = torch.tensor([1.0, 0.05]).view(2, 1, 1, 1, 1), torch.tensor([3.0, -40.0]).view(2, 1, 1, 1, 1)
    x = torch.randn(2, 1, 24, 20, 16) * spread + offset
    expected = copy.deepcopy(block).double()(x.double())
    with torch.no_grad():
        out, monai_out = fused(x), block(x)
    assert out.shape == expected.shape == (2, 6, 24, 20, 16) and out.dtype == torch.float32
    assert (out.double() - expected).abs().max() < 1e-4
    assert not torch.equal(out, monai_out)  # the closed form ran: it rounds differently
    assert out.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    assert _autograd_nodes(fused(x))["ConvolutionBackward0"] == 3  # with gradients: MONAI's three convolutions
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused(x), block(x))


def test_fused_input_block_folds_only_single_channel_input_blocks():
    """In SwinUNETR on one channel only `encoder1`; on several channels, with dropout or `enabled=False`, none."""
    import copy

    torch.manual_seed(0)
    net = SwinUNETR(1, 14, feature_size=12).eval()
    reference = copy.deepcopy(net)
    assert fused_input_block.fuse_input_block(net) is net and list(net.state_dict()) == list(reference.state_dict())
    assert [name for name, m in net.named_modules() if type(m) is fused_input_block.FusedInputBlock] == ["encoder1"]
    x = torch.rand(1, 1, 64, 64, 64) * 4 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), atol=1e-5, rtol=1e-5)
    two_channels = SwinUNETR(2, 3, feature_size=12)
    fused_input_block.fuse_input_block(two_channels)
    assert not any(type(m) is fused_input_block.FusedInputBlock for m in two_channels.modules())
    dropout = _input_block(6)
    dropout.layer.conv1.add_module("dropout", torch.nn.Dropout3d())
    assert type(fused_input_block.fuse_input_block(dropout)).__name__ == "UnetrBasicBlock"
    assert type(fused_input_block.fuse_input_block(_input_block(6), enabled=False)).__name__ == "UnetrBasicBlock"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(6, 10, 12), (5, 3, 4)])
def test_winograd_convolution_gives_the_convolutions_outputs(bias, shape):
    """`cpu_winograd`: F(4,3) along the last axis gives `F.conv3d`'s outputs with padding 1 (float32 against float64,
    batch of 2, edge tiles, one tile), channels-last."""
    torch.manual_seed(0)
    x = (torch.randn(2, 5, *shape) + 3).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(7, 5, 3, 3, 3).to(memory_format=torch.channels_last_3d)
    b = torch.randn(7) if bias else None
    expected = torch.nn.functional.conv3d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    out = winograd_conv.winograd_conv3d(x, weight, b)
    assert out.shape == expected.shape == (2, 7, *shape) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert (out.double() - expected).abs().max() < 1e-4 * expected.abs().max()


def test_winograd_layers_take_the_path_only_for_large_float32_maps_without_gradients():
    """Wide channels-last maps of 24^3 or more in inference; PyTorch's convolution for everything else."""
    import copy

    torch.manual_seed(0)
    channels_last = torch.channels_last_3d
    plain = torch.nn.Conv3d(48, 8, 3, padding=1, bias=True).to(memory_format=channels_last)
    conv = copy.deepcopy(plain)
    assert winograd_conv.use_winograd(conv) is conv and type(conv) is winograd_conv.WinogradConv3d
    x = torch.randn(1, 48, 24, 24, 24).to(memory_format=channels_last)
    with torch.no_grad():
        out = conv(x)
        expected = copy.deepcopy(plain).double()(x.double())
        assert (out.double() - expected).abs().max() < 1e-4 and not torch.equal(out, plain(x))  # F(4,3) ran
        for other in (x.contiguous(), x[..., :22], x[:, :, :16, :16, :16]):  # layout, width, size
            assert torch.equal(conv(other), plain(other))
        narrow = torch.nn.Conv3d(32, 8, 3, padding=1).to(memory_format=channels_last)  # too few channels
        assert torch.equal(winograd_conv.use_winograd(copy.deepcopy(narrow))(x[:, :32]), narrow(x[:, :32]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(conv(x), plain(x))
    assert torch.equal(conv(x), plain(x)) and _autograd_nodes(conv(x))["ConvolutionBackward0"] == 1


def test_use_winograd_swaps_only_plain_3x3x3_convolutions():
    """In SwinUNETR: every 3^3 stride-1 convolution, none of the 1^3, strided or transposed ones; same parameters and,
    at feature 48, the same outputs within float32 rounding; `enabled=False` swaps none."""
    import copy

    torch.manual_seed(0)
    net = SwinUNETR(1, 14, feature_size=48).to(memory_format=torch.channels_last_3d).eval()
    reference = copy.deepcopy(net)
    assert winograd_conv.use_winograd(net) is net and list(net.state_dict()) == list(reference.state_dict())
    convolutions = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    kinds = collections.Counter((type(m).__name__, m.kernel_size, m.stride) for m in convolutions)
    assert kinds[("WinogradConv3d", (3, 3, 3), (1, 1, 1))] == 20 and kinds[("Conv3d", (3, 3, 3), (1, 1, 1))] == 0
    assert kinds[("Conv3d", (1, 1, 1), (1, 1, 1))] > 0 and kinds[("ConvTranspose3d", (2, 2, 2), (2, 2, 2))] == 5
    assert kinds[("Conv3d", (2, 2, 2), (2, 2, 2))] == 1  # the patch embedding
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        out, expected = net(x), reference(x)
    assert not torch.equal(out, expected)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    dilated = torch.nn.Conv3d(4, 4, 3, padding=2, dilation=2)
    untouched = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), dilated)
    assert type(winograd_conv.use_winograd(untouched, enabled=False)[0]) is torch.nn.Conv3d
    assert type(winograd_conv.use_winograd(untouched)[1]) is torch.nn.Conv3d


def test_attention_masks_are_built_once_per_shape_and_give_the_same_outputs(monkeypatch):
    """`cpu_mask_cache`: the network's outputs stay exactly the same, each Swin stage's mask is built once, and a mask
    first built in inference mode also serves training with gradients."""
    from monai.networks.nets import swin_unetr

    build, built = swin_unetr.compute_mask, []

    def counting(dims, window_size, shift_size, device):
        built.append(tuple(dims))
        return build(dims, window_size, shift_size, device)

    monkeypatch.setattr(swin_unetr, "compute_mask", counting)  # restored after the test, cache and all
    torch.manual_seed(0)
    net = SwinUNETR(1, 3, feature_size=12).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.inference_mode():
        expected = net(x)
    stages = len(built)
    assert stages == len(set(built)) == 4
    assert window_attention.cache_attention_masks(False) is False and swin_unetr.compute_mask is counting
    assert window_attention.cache_attention_masks(True) is True and window_attention.cache_attention_masks(True)
    with torch.inference_mode():
        assert torch.equal(net(x), expected) and torch.equal(net(x), expected)
    assert len(built) == 2 * stages and swin_unetr.compute_mask.cache_info().hits == stages
    net.train()
    net(x).sum().backward()  # would raise if an inference-mode mask were saved for backward
    assert len(built) == 2 * stages and all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.eval()  # TorchScript tracing builds its masks, so that two traces agree (a cached one would be a constant)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)  # checks the trace against a second one: raises if the graphs differ
        assert torch.equal(traced(x), expected)
    # the trace and the check's second trace build their own masks; the check's eager run reuses the cached ones
    assert len(built) == 4 * stages and swin_unetr.compute_mask.cache_info().hits == 3 * stages


@pytest.mark.parametrize("batch", [1, 2])
def test_chunked_window_attention_gives_the_same_outputs_and_gradients(batch):
    """Groups of windows (shifted ones with their masks, and not) give MONAI's outputs and parameter gradients, while
    no attention weights above the budget exist at any time; parameters and state-dict keys stay as they are."""
    import copy

    from monai.networks.nets.swin_unetr import WindowAttention

    torch.manual_seed(0)
    net = SwinUNETR(1, 14, feature_size=12, use_checkpoint=True)
    chunked = copy.deepcopy(net)
    blocks = sum(type(m) is WindowAttention for m in net.modules())
    assert window_attention.chunk_window_attention(chunked, 12) is chunked  # a window of the third stage: 5.6 MB
    assert blocks > 0 and sum(type(m) is window_attention.ChunkedWindowAttention for m in chunked.modules()) == blocks
    assert chunked.state_dict().keys() == net.state_dict().keys()

    largest = {}  # bytes of the largest attention-weight tensor, per network

    def run(network):
        def record(module, args, output):
            largest[id(network)] = max(largest.get(id(network), 0), output.numel() * output.element_size())

        hooks = [m.softmax.register_forward_hook(record) for m in network.modules() if isinstance(m, WindowAttention)]
        x = torch.rand(batch, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
        out = network(x)
        out.square().mean().backward()
        for hook in hooks:
            hook.remove()
        return out.detach(), {k: p.grad for k, p in network.named_parameters()}

    expected, expected_grads = run(net)
    out, grads = run(chunked)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, atol=1e-6, rtol=1e-4, msg=key)
    assert largest[id(chunked)] <= 12 * 2**20 < largest[id(net)]


def test_chunked_window_attention_setting_is_checked():
    from monai.networks.nets.swin_unetr import WindowAttention

    net = SwinUNETR(1, 14, feature_size=12)
    assert window_attention.chunk_window_attention(net, None) is net
    assert not any(type(m) is window_attention.ChunkedWindowAttention for m in net.modules())
    assert any(type(m) is WindowAttention for m in net.modules())
    for wrong in (0, -1, True, "128", float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^cpu_attention_chunk_mb must be a number of megabytes > 0, or null"):
            window_attention.chunk_window_attention(net, wrong)


@pytest.mark.parametrize("decollated", [False, True])
def test_finite_loss_check_raises_at_the_first_nan(decollated):
    from ignite.engine import Engine

    losses = [0.5, 0.4, float("nan"), 0.3]

    def step(engine, batch):
        output = {"loss": torch.tensor(losses[engine.state.iteration - 1])}
        return [output] if decollated else output

    engine = Engine(step)
    finite_loss.FiniteLossCheck(ckpt_dir="/runs/models").attach(engine)
    with pytest.raises(FloatingPointError, match=r"^training loss is nan at epoch 1, iteration 3: .* /runs/models"):
        engine.run(range(4), max_epochs=1)
    assert engine.state.iteration == 3  # stopped there, the fourth step never ran
    finite = Engine(lambda engine, batch: {"loss": torch.tensor(0.5)})
    finite_loss.FiniteLossCheck().attach(finite)
    assert finite.run(range(4), max_epochs=2).iteration == 8
