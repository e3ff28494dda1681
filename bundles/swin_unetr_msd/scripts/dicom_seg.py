# Copied from common_scripts/dicom_seg.py by ci/sync_scripts.py: edit that file, then run the script.
"""DICOM SEG output for DICOM input: the label map as a segmentation object that references the source series.

PACS, OHIF and MONAI Deploy take a DICOM SEG, not a NIfTI. MONAI writes no DICOM; `highdicom` builds the object
(segments, codes, references, per-frame geometry) and is the package the DICOM community maintains for it. What
this module adds is the mapping from the bundle's prediction (an array in the original image space, affine in RAS)
onto the source images' pixel grids, computed from each file's position and orientation rather than assumed from
an order of slices, and the segment descriptions (names from the bundle's metadata, colours of its pictures).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data.utils import orientation_ras_lps
from monai.transforms import MapTransform
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes

from .atomic_files import atomic_path
from .datalist import is_dicom_file
from .overlays import label_colours

logger = logging.getLogger(__name__)
# words of a label name that make it an altered structure (DICOM CID 7150) rather than an anatomical one
ALTERED = ("tumour", "tumor", "cancer", "lesion", "edema", "oedema", "necrotic", "enhancing", "mass")


def source_images(path: str) -> list[Dataset]:
    """The DICOM images (header only) of the single-frame series the bundle read from `path` (a folder or a file).

    Args:
        path: the input image as the bundle read it: a series folder, or one DICOM file.

    Raises:
        ValueError: `path` holds no DICOM, several series, or multi-frame images.
    """
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in sorted(os.listdir(path))]
    images = [dcmread(f, stop_before_pixels=True) for f in files if is_dicom_file(f)]
    if not images:
        raise ValueError(f"{path!r} holds no DICOM images.")
    series = {str(image.SeriesInstanceUID) for image in images}
    if len(series) > 1:
        raise ValueError(f"{path!r} holds {len(series)} DICOM series; a DICOM SEG references one: one series a folder.")
    if any(int(getattr(image, "NumberOfFrames", 1) or 1) > 1 for image in images):
        raise ValueError(f"{path!r} is a multi-frame image; DICOM SEG output covers series of single-frame images.")
    return images


def frames_on_sources(labels: np.ndarray, affine: np.ndarray, images: Sequence[Dataset]) -> np.ndarray:
    """The label map sampled on each source image's pixel grid: `(len(images), rows, columns)`.

    Each pixel's patient position (from ImagePositionPatient, ImageOrientationPatient and PixelSpacing) is taken to
    the label map's voxel indices through `affine`; they must land on voxel centres inside the map, since the
    prediction was inverted to the grid the series was read on.

    Args:
        labels: the label map, `(x, y, z)`.
        affine: its voxel-to-LPS affine (DICOM's patient space).
        images: the source images.

    Raises:
        ValueError: the label map's grid does not match the source images.
    """
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    frames = []
    for image in images:
        rows, columns = int(image.Rows), int(image.Columns)
        origin = np.asarray(image.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
        r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
        lps = origin + c[..., None] * column_spacing * orientation[:3] + r[..., None] * row_spacing * orientation[3:]
        voxel = lps @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        index = np.rint(voxel).astype(np.int64)
        if np.abs(voxel - index).max() > 0.05 or (index < 0).any() or (index >= labels.shape).any():
            raise ValueError(
                f"the prediction's grid {labels.shape} does not match DICOM image {image.SOPInstanceUID} "
                f"({rows} x {columns} at {origin.tolist()})."
            )
        frames.append(labels[index[..., 0], index[..., 1], index[..., 2]])
    return np.stack(frames)


def segment_codes(name: str) -> tuple:
    """(category, type) codes of a label: SNOMED CT where pydicom knows the structure (a leading 'left'/'right'
    dropped), else a code of this bundle's own scheme named after the label."""
    from highdicom.sr import CodedConcept

    words = name.replace("-", " ").split()
    altered = any(word.lower() in ALTERED for word in words)
    altered_structure = CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
    category = altered_structure if altered else codes.SCT.AnatomicalStructure
    for candidate in (words, words[1:] if words[:1] in (["left"], ["right"]) else []):
        keyword = "".join(word.capitalize() for word in candidate)
        if keyword and hasattr(codes.SCT, keyword):
            return category, getattr(codes.SCT, keyword)
    return category, CodedConcept(name.replace(" ", "_")[:16].upper(), "99SWINUNETR", name)


def segmentation(
    labels: np.ndarray,
    affine: np.ndarray,
    images: Sequence[Dataset],
    label_names: Mapping[int, str],
    model_name: str,
    version: str,
):
    """A `highdicom` DICOM SEG of the labels present in `labels`, one segment each, on the grid of `images`.

    Args:
        labels: the label map, `(x, y, z)`, in the space of `affine`.
        affine: its voxel-to-LPS affine (DICOM's patient space).
        images: the source series (headers).
        label_names: the name of each label number (0 is the background, never a segment).
        model_name: the bundle's name, recorded as the algorithm and the manufacturer's model.
        version: the bundle's version.
    """
    import highdicom as hd

    frames = frames_on_sources(labels, affine, images)
    present = [int(v) for v in np.unique(frames) if v > 0]
    if not present:
        return None
    numbered = np.zeros(frames.shape, dtype=np.uint8)  # segment numbers run 1..n over the labels present
    for number, value in enumerate(present, start=1):
        numbered[frames == value] = number
    colours = label_colours(max(present) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], version=version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, value in enumerate(present, start=1):
        name = label_names.get(value, f"label {value}")
        category, kind = segment_codes(name)
        rgb = tuple(int(round(255 * channel)) for channel in colours[value][:3])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*rgb),
            )
        )
    return hd.seg.Segmentation(
        source_images=list(images),
        pixel_array=numbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MONAI",
        manufacturer_model_name=model_name[:64],
        software_versions=version,
        device_serial_number="none",
        content_label="SWINUNETR",
        content_description=f"{model_name} {version}"[:64],
        series_description=f"{model_name} segmentation"[:64],
    )


class SaveDicomSegd(MapTransform):
    """Writes `<case>_<postfix>.dcm`, a DICOM SEG of the label map at each key, beside the NIfTI output when the
    input was a DICOM series; other inputs are passed through with one log line. The file appears complete or not
    at all (`atomic_files`).

    Args:
        keys: the label maps to write (channel-first, in the original image space, as `SaveImaged` writes them).
        output_dir: the folder to write to.
        metadata_file: the bundle's `metadata.json`: its `name` and `version` name the algorithm, and its `pred`
            output's `channel_def` names the labels unless `label_names` is given. Read from the file because MONAI
            Label parses `inference.json` without the metadata.
        label_names: the name of each label number (an MSD task's `labels`), or None for the metadata's.
        output_postfix: the file name's postfix after the case name.
        allow_missing_keys: as in MONAI's `MapTransform`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        metadata_file: str,
        label_names: Mapping | None = None,
        output_postfix: str = "seg",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        try:
            import highdicom  # noqa: F401
        except ImportError as error:  # said at start, before any image is segmented
            raise ImportError("write_dicom_seg needs the highdicom package: pip install highdicom") from error
        with open(metadata_file) as file:
            metadata = json.load(file)
        if label_names is None:
            label_names = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        self.output_dir = output_dir
        self.label_names = {int(k): str(v) for k, v in label_names.items()}
        self.model_name, self.version = str(metadata["name"]), str(metadata["version"])
        self.output_postfix = output_postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label_map = d[key]
            source = str(label_map.meta["filename_or_obj"])
            case = os.path.basename(os.path.normpath(source))
            if not (os.path.isdir(source) or is_dicom_file(source)):
                logger.info(f"no DICOM SEG for {case}: its input is not DICOM.")
                continue
            affine = np.asarray(label_map.affine, dtype=np.float64)
            if str(label_map.meta.get("space", "RAS")) != "LPS":  # MONAI's readers give RAS unless told otherwise
                affine = orientation_ras_lps(affine)
            labels = np.asarray(label_map.detach().cpu())[0]
            seg = segmentation(labels, affine, source_images(source), self.label_names, self.model_name, self.version)
            if seg is None:
                logger.warning(f"no DICOM SEG for {case}: the prediction holds no structure.")
                continue
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, f"{case}_{self.output_postfix}.dcm")
            with atomic_path(path) as partial:
                seg.save_as(partial)
            logger.info(f"written: {path}")
        return d
