"""How far the BTCV bundle's float32 probabilities are from a float64 run of the same weights, through PyTorch (the
shipped path) and through OpenVINO (`cpu_inference_engine` `openvino`), at 1 and 2 threads (docs/performance.md).

The case and the untrained tiny network are those of `tests/test_inference_equivalence.py`; the float64 run is plain
MONAI `SwinUNETR` under the bundle's own sliding-window inferer. Prints one JSON line per engine and thread count.

    python ci/openvino_accuracy.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "swin_unetr_btcv")
TINY = {"feature_size": 12, "roi_size": [64, 64, 64], "use_checkpoint": False}


def _parser(dataset_dir: str, ckpt_dir: str, **overrides):
    """The BTCV inference config with the tiny settings, `dataset_dir`, `ckpt_dir` and `overrides`."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "inference.json"))
    parser["bundle_root"] = BUNDLE
    for key, value in dict(TINY, dataset_dir=dataset_dir, ckpt_dir=ckpt_dir, **overrides).items():
        parser[key] = value
    return parser


def measure(root: str) -> None:
    """Writes the case, the weights and the OpenVINO conversion under `root` and prints the errors.

    Args:
        root: an empty folder.
    """
    import synthetic_ct
    from monai.networks.nets import SwinUNETR

    os.makedirs(os.path.join(root, "images"))
    image, _, affine = synthetic_ct.make_case(seed=4, shape=(110, 100, 40))
    path = os.path.join(root, "images", "case.nii.gz")
    synthetic_ct.save_nifti(image, affine, path)
    torch.manual_seed(0)
    weights = SwinUNETR(1, 14, feature_size=TINY["feature_size"]).state_dict()
    torch.save(weights, os.path.join(root, "model.pt"))

    parser = _parser(os.path.dirname(path), root)
    window = parser.get_parsed_content("preprocessing")({"image": path})["image"][None].as_tensor()
    reference = SwinUNETR(1, 14, feature_size=TINY["feature_size"]).double().eval()
    reference.load_state_dict(weights)
    with torch.no_grad():
        float64 = parser.get_parsed_content("inferer")(window.double(), reference).softmax(1)

    for engine in ("torch", "openvino"):
        for threads in (1, 2):
            torch.set_num_threads(threads)  # OpenVINO's INFERENCE_NUM_THREADS follows it
            parser = _parser(os.path.dirname(path), root, cpu_inference_engine=engine)
            network = parser.get_parsed_content("network")
            network.load_state_dict(weights)
            network.eval()
            with torch.no_grad():
                float32 = parser.get_parsed_content("inferer")(window, network).softmax(1)
            error = (torch.as_tensor(float32).double() - float64).abs()
            print(json.dumps({"engine": engine, "threads": threads, "max_abs_vs_float64": float(error.max()),
                              "voxels_over_1e-3": int((error > 1e-3).sum())}))  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, BUNDLE)  # the config's `scripts` package
    sys.path.insert(0, os.path.join(REPO, "ci"))
    with tempfile.TemporaryDirectory(prefix="openvino_accuracy_") as folder:
        measure(folder)
