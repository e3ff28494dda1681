"""The anatomical phantoms: BTCV geometry and labels, and hard in the ways the SSL experiment needs."""

import json
import os

import nibabel as nib
import numpy as np
import phantom_ct
import pytest
from conftest import synthetic_ct


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Three training and two test phantoms at half size (fast to make, the same anatomy)."""
    return phantom_ct.generate(str(tmp_path_factory.mktemp("phantoms")), num_train=3, num_test=2, seed=5, fov_scale=0.5)


def test_phantom_has_ct_geometry_and_the_btcv_organs():
    image, label, affine = phantom_ct.make_phantom(seed=3, fov_scale=0.6)
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == label.shape
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    spacing = np.abs(np.diag(affine)[:3])
    assert 0.8 <= spacing[0] == spacing[1] <= 1.0 and spacing[2] in (2.0, 2.5, 3.0)
    assert set(np.unique(label)) <= set(range(14)) and len(np.unique(label)) >= 12  # an organ may lie outside the scan
    assert (image <= -900).mean() > 0.1  # air around the body
    assert ((image > -150) & (image < -50)).mean() > 0.05  # fat
    assert (image > 300).sum() > 1000  # spine


def test_phantoms_are_deterministic_by_seed_and_vary_between_patients():
    a, la, affine_a = phantom_ct.make_phantom(seed=7, fov_scale=0.4)
    b, lb, _ = phantom_ct.make_phantom(seed=7, fov_scale=0.4)
    c, _, affine_c = phantom_ct.make_phantom(seed=8, fov_scale=0.4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert not np.allclose(affine_a, affine_c)  # spacing and field of view differ per scan


def test_organ_intensities_overlap(phantoms):
    """Neighbouring organs share HU values: the middle half of the liver's and the spleen's, pancreas' and
    IVC's intensities overlap."""
    image = np.asarray(nib.load(os.path.join(phantoms, "imagesTr", "img0001.nii.gz")).dataobj)
    label = np.asarray(nib.load(os.path.join(phantoms, "labelsTr", "label0001.nii.gz")).dataobj)
    quartiles = {organ: np.percentile(image[label == organ], [25, 75]) for organ in (1, 6, 9, 11)}
    liver = quartiles[6]
    for organ in (1, 9, 11):
        low, high = quartiles[organ]
        assert low < liver[1] and high > liver[0], (organ, quartiles[organ], liver)


def test_dataset_lists_training_and_labelled_test_cases(phantoms):
    dataset = json.load(open(os.path.join(phantoms, "dataset.json")))
    assert [c["image"] for c in dataset["training"]] == [f"./imagesTr/img000{i}.nii.gz" for i in (1, 2, 3)]
    assert [c["label"] for c in dataset["test"]] == ["./labelsTs/label0004.nii.gz", "./labelsTs/label0005.nii.gz"]
    for case in dataset["training"] + dataset["test"]:
        image, label = (nib.load(os.path.join(phantoms, case[k])) for k in ("image", "label"))
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine)


def test_intensity_lookup_cannot_segment_phantoms_but_can_segment_ellipsoids(phantoms, tmp_path):
    """The best HU interval per organ, fitted on training cases, scores low on the phantoms' test cases; on the
    plumbing generator's constant-HU ellipsoids the same lookup does well, so the figure tells the two apart."""
    dataset = json.load(open(os.path.join(phantoms, "dataset.json")))
    resolve = lambda cases: [{k: os.path.join(phantoms, v) for k, v in c.items()} for c in cases]  # noqa: E731
    hard = phantom_ct.hu_lookup_dice(resolve(dataset["training"]), resolve(dataset["test"]))
    assert hard["mean"] < 0.2, hard

    easy = []
    for n in range(4):
        image, label, affine = synthetic_ct.make_case(seed=n, shape=(120, 110, 36))
        case = {"image": str(tmp_path / f"img{n}.nii.gz"), "label": str(tmp_path / f"lbl{n}.nii.gz")}
        synthetic_ct.save_nifti(image, affine, case["image"])
        synthetic_ct.save_nifti(label, affine, case["label"])
        easy.append(case)
    assert phantom_ct.hu_lookup_dice(easy[:3], easy[3:])["mean"] > 0.35


def test_random_crops_of_a_phantom_differ(phantoms):
    figures = phantom_ct.hardness(phantoms, roi=64)
    assert figures["volume_in_rois"] > 3.0
    assert figures["mean_crop_overlap"] < 0.7
    assert phantom_ct.crop_overlap(np.zeros((64, 64, 64)), 64) == 1.0  # a volume of one ROI: every crop the same
    assert 0.0 < figures["hu_lookup_mean_dice"] < 0.2
