"""Measurements behind the quickstart recipe (docs/quickstart.md, docs/learning_curves.md): what a training patch
sees, the best Dice a given training spacing allows once predictions are mapped back to each image's original space,
and which organ a trained model takes each organ's voxels for.

All read the BTCV bundle's own train config with command-line style overrides, so they measure what a run with
those settings would see; none trains.

    python ci/quickstart_diagnosis.py patches --dataset_dir quickstart/data
    python ci/quickstart_diagnosis.py ceiling --dataset_dir quickstart/data --pixdim "[3.0,3.0,4.0]"
    python ci/quickstart_diagnosis.py confusion --dataset_dir DATA --ckpt_dir MODELS --feature_size 12 ...
"""

from __future__ import annotations

import ast
import json
import os
import sys

import nibabel as nib
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "swin_unetr_btcv")


def _parser(**overrides):
    """The BTCV train config parsed with `overrides` (values given as Python literals, as on the command line)."""
    from monai.bundle import ConfigParser

    sys.path.insert(0, BUNDLE)
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    parser["bundle_root"] = BUNDLE
    for key, value in overrides.items():
        parser[key] = ast.literal_eval(value) if isinstance(value, str) and not key.endswith("_dir") else value
    return parser


def patches(dataset_dir: str, num_epochs: int = 5, seed: int = 0, **overrides) -> dict[str, float]:
    """Share of training patches (drawn by the config's own random transforms over `num_epochs` passes of the
    training cases) that contain each organ, and each organ's share of the patches' labelled voxels."""
    from monai.utils import set_determinism

    parser = _parser(dataset_dir=dataset_dir, cache_rate=0.0, num_workers=0, **overrides)
    set_determinism(seed)
    dataset = parser.get_parsed_content("train#dataset")
    num_classes = parser.get_parsed_content("num_classes")
    seen = np.zeros(num_classes)
    voxels = np.zeros(num_classes)
    count = 0
    for _ in range(num_epochs):
        for index in range(len(dataset)):
            samples = dataset[index]
            for sample in samples if isinstance(samples, list) else [samples]:
                label = torch.as_tensor(sample["label"]).long().flatten()
                counts = torch.bincount(label, minlength=num_classes).numpy()
                seen += counts > 0
                voxels += counts
                count += 1
    names = json.load(open(os.path.join(BUNDLE, "configs", "metadata.json")))["network_data_format"]["outputs"]
    names = names["pred"]["channel_def"]
    result = {"patches": count}
    for organ in range(1, num_classes):
        result[f"in_patches/{names[str(organ)]}"] = float(seen[organ] / count)
        result[f"of_foreground/{names[str(organ)]}"] = float(voxels[organ] / voxels[1:].sum())
    return result


def ceiling(dataset_dir: str, **overrides) -> dict[str, float]:
    """Mean Dice per organ of the labels themselves taken through the config's resampling to `pixdim` and back
    (one-hot, linear both ways, argmax), as the evaluation maps probabilities back: an upper bound on any network
    trained at that spacing, over the training cases."""
    from monai.transforms import Compose, Invertd

    parser = _parser(dataset_dir=dataset_dir, **overrides)
    cases = parser.get_parsed_content("datasplit")["training"]
    num_classes = parser.get_parsed_content("num_classes")
    transforms = parser.get_parsed_content("train#deterministic_transforms")
    preprocess = Compose(transforms[:3])  # load, orientation, spacing: what Invertd undoes
    dice = np.zeros((len(cases), num_classes - 1))
    for n, case in enumerate(cases):
        original = nib.load(case["label"]).get_fdata()
        data = preprocess({"image": case["image"], "label": case["label"]})
        onehot = torch.nn.functional.one_hot(data["label"][0].long(), num_classes).permute(3, 0, 1, 2).float()
        data["pred"] = data["label"].clone()
        data["pred"].set_array(onehot)
        back = Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=False)(data)["pred"]
        predicted = back.argmax(0)
        truth = torch.as_tensor(original).long()
        for organ in range(1, num_classes):
            p, t = predicted == organ, truth == organ
            dice[n, organ - 1] = 2 * (p & t).sum() / max(1, p.sum() + t.sum())
    names = json.load(open(os.path.join(BUNDLE, "configs", "metadata.json")))["network_data_format"]["outputs"]
    names = names["pred"]["channel_def"]
    result = {"mean": float(dice.mean())}
    result.update({names[str(o + 1)]: float(d) for o, d in enumerate(dice.mean(0))})
    return result


def confusion(dataset_dir: str, ckpt_dir: str, **overrides) -> dict[str, dict[str, float]]:
    """For each organ, the share of its voxels in the validation cases that the model in `ckpt_dir/model.pt` labels
    as each class (background included), at the training spacing with the config's own sliding window: where an
    organ's voxels go when its Dice stays at 0.

    Args:
        dataset_dir: the data set (its validation split is scored).
        ckpt_dir: the folder of `model.pt`.
        overrides: the settings the model was trained with (feature_size, pixdim, ...), as on the command line.
    """
    parser = _parser(dataset_dir=dataset_dir, ckpt_dir=ckpt_dir, cache_rate=0.0, num_workers=0, **overrides)
    num_classes = parser.get_parsed_content("num_classes")
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(os.path.join(ckpt_dir, "model.pt"), map_location="cpu", weights_only=True))
    inferer = parser.get_parsed_content("validate#inferer")
    dataset = parser.get_parsed_content("validate#dataset")
    counts = np.zeros((num_classes, num_classes))
    with torch.no_grad():
        for item in dataset:
            predicted = inferer(item["image"][None].as_tensor(), network.eval()).argmax(1)[0].flatten()
            truth = torch.as_tensor(item["label"][0]).long().flatten()
            counts += (
                torch.bincount(truth * num_classes + predicted, minlength=num_classes**2)
                .reshape(num_classes, num_classes)
                .numpy()
            )
    names = json.load(open(os.path.join(BUNDLE, "configs", "metadata.json")))["network_data_format"]["outputs"]
    names = names["pred"]["channel_def"]
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return {
        names[str(t)]: {
            names[str(p)]: round(float(shares[t, p]), 3) for p in range(num_classes) if shares[t, p] >= 0.05
        }
        for t in range(1, num_classes)
    }


if __name__ == "__main__":
    import fire

    fire.Fire({"patches": patches, "ceiling": ceiling, "confusion": confusion})
