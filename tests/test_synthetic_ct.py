import json

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL_SHAPE, synthetic_ct
from monai.transforms import LoadImage


def test_case_has_ct_like_intensities_and_all_organs():
    image, label, affine = synthetic_ct.make_case(seed=3)
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.shape == label.shape == (150, 140, 44)
    assert (image == -1000).mean() > 0.1  # air around the body
    assert ((image > -150) & (image < -50)).mean() > 0.02  # subcutaneous fat
    assert (image > 500).sum() > 100  # spine
    assert set(np.unique(label)) == set(range(14))
    liver, aorta = image[label == 6], image[label == 8]
    assert 60 < liver.mean() < 100 and 190 < aorta.mean() < 230


def test_affine_is_real_lps_geometry():
    _, _, affine = synthetic_ct.make_case(seed=0, spacing=(0.8, 0.8, 2.5))
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), [0.8, 0.8, 2.5])
    assert not np.allclose(affine, np.eye(4))


def test_deterministic_by_seed():
    a, la, _ = synthetic_ct.make_case(seed=11, shape=SMALL_SHAPE)
    b, lb, _ = synthetic_ct.make_case(seed=11, shape=SMALL_SHAPE)
    c, _, _ = synthetic_ct.make_case(seed=12, shape=SMALL_SHAPE)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_num_organs_limits_labels():
    _, label, _ = synthetic_ct.make_case(seed=0, shape=SMALL_SHAPE, num_organs=3)
    assert set(np.unique(label)) <= {0, 1, 2, 6}


def test_btcv_layout(tmp_path):
    synthetic_ct.generate(str(tmp_path), layout="btcv", num_train=2, num_test=1, shape=SMALL_SHAPE)
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == ["img0001.nii.gz", "img0002.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["label0001.nii.gz", "label0002.nii.gz"]
    assert [p.name for p in (tmp_path / "imagesTs").iterdir()] == ["img0003.nii.gz"]
    img = nib.load(tmp_path / "imagesTr" / "img0001.nii.gz")
    lbl = nib.load(tmp_path / "labelsTr" / "label0001.nii.gz")
    assert img.shape == lbl.shape == SMALL_SHAPE
    np.testing.assert_allclose(img.affine, lbl.affine)
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5))


def test_msd_layout_with_dataset_json(tmp_path):
    synthetic_ct.generate(str(tmp_path), layout="msd", num_train=2, num_test=1, shape=SMALL_SHAPE)
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "CT"}
    assert len(dataset["labels"]) == 14 and dataset["labels"]["6"] == "liver"
    assert dataset["numTraining"] == 2 and dataset["numTest"] == 1
    for item in dataset["training"]:
        assert (tmp_path / item["image"]).is_file() and (tmp_path / item["label"]).is_file()
    assert (tmp_path / dataset["test"][0]).is_file()


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="layout must be"):
        synthetic_ct.generate(str(tmp_path), layout="nnunet")


def test_dicom_series_reads_back_like_the_nifti(tmp_path):
    image, _, affine = synthetic_ct.make_case(seed=2, shape=(64, 60, 12))
    synthetic_ct.write_dicom_series(image, affine, str(tmp_path / "series"))
    synthetic_ct.save_nifti(image, affine, str(tmp_path / "volume.nii.gz"))
    from_dicom = LoadImage(image_only=True, reader="PydicomReader")(str(tmp_path / "series"))
    from_nifti = LoadImage(image_only=True)(str(tmp_path / "volume.nii.gz"))
    np.testing.assert_array_equal(from_dicom.numpy(), from_nifti.numpy())
    np.testing.assert_allclose(from_dicom.affine.numpy(), from_nifti.affine.numpy(), atol=1e-4)
