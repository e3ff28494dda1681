"""How much the pre-trained Swin encoder's output at each stage still depends on its input (docs/ssl_experiment.md).

All three proxy heads of the pre-training bundle read the encoder's last stage, so an encoder whose last stage gives
every input the same output fails all three tasks at once. This measures that for an SSL experiment's folder: the
held-out test CTs of its gate, each also turned 90 degrees in the rotation plane, go through the pre-training
bundle's deterministic preprocessing and a centre crop of `roi_size`, then through the encoder of
`pretrain/models/model.pt` and through the same network freshly initialised (seed 0). For each stage it reports the
relative spread of the (layer-normalised) outputs across those inputs; 0 means the stage ignores its input.

    python ci/encoder_collapse.py --out_dir experiments/ssl_cpu

Writes `pretrain/encoder_collapse.json` into `out_dir` and prints it. Measures only; trains nothing.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from ssl_experiment import REPO, write_json_atomic

PRETRAIN = os.path.join(REPO, "bundles", "swin_unetr_pretrain")


def relative_spread(outputs: torch.Tensor) -> float:
    """The standard deviation across inputs (dim 0), averaged over every other position, over the mean absolute
    value: 0 when every input gives the same output, about 1 or more for unrelated outputs.

    Args:
        outputs: one stage's outputs, inputs along the first dimension (at least two).
    """
    return float(outputs.std(dim=0).mean() / outputs.abs().mean())


def bundle_parser(**settings: object):
    """The pre-training bundle's train config with `settings` (public settings, as on the command line) applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(PRETRAIN, "configs", "train.json"))
    for key, value in settings.items():
        parser[key] = value
    return parser


def parsed(parser, key: str):
    """`key` of a pre-training config, its `scripts.` targets resolved against the pre-training bundle's."""
    sys.path.insert(0, PRETRAIN)
    try:
        return parser.get_parsed_content(key, lazy=False)
    finally:
        sys.path.remove(PRETRAIN)


def held_out_views(parser, images: list[str], roi: list[int]) -> torch.Tensor:
    """`images` through the config's deterministic preprocessing and a centre crop of `roi`, each also turned 90
    degrees in the config's rotation plane: (2 x len(images), 1, *roi)."""
    from monai.transforms import CenterSpatialCropd, Compose

    preprocessing = Compose(parsed(parser, "train#deterministic_transforms") + [CenterSpatialCropd("image", roi)])
    volumes = torch.stack([preprocessing({"image": image})["image"].as_subclass(torch.Tensor) for image in images])
    plane = [2 + axis for axis in parser["rotation_axes"]]  # the spatial axes the rotation task turns
    return torch.cat([volumes, torch.rot90(volumes, 1, plane)])


def stage_spreads(encoder: torch.nn.Module, views: torch.Tensor) -> list[float]:
    """`relative_spread` of each stage's outputs of a MONAI `SwinTransformer` across `views`, in eval mode."""
    was_training = encoder.training
    with torch.no_grad():
        spreads = [relative_spread(stage.float()) for stage in encoder.eval()(views)]
    encoder.train(was_training)
    return spreads


def main(out_dir: str = "experiments/ssl_cpu") -> dict:
    """Measures the stage-wise spread of the experiment's pre-trained encoder and of a fresh one; returns the record.

    Args:
        out_dir: an SSL experiment's folder whose pre-training and gate (a) are done (`ci/ssl_experiment.py`).
    """
    with open(os.path.join(out_dir, "preset.json")) as f:
        preset = json.load(f)
    with open(os.path.join(out_dir, "pretrain", "gate", "held_out.json")) as f:
        images = [case["image"] for case in json.load(f)["validation"]]
    roi = [preset["roi_size"]] * 3
    settings = dict(feature_size=preset["feature_size"], roi_size=roi, use_checkpoint=False)
    if preset.get("pixdim"):
        settings["pixdim"] = preset["pixdim"]
    parser = bundle_parser(**settings)
    views = held_out_views(parser, images, roi)
    trained = parsed(parser, "network_def")
    torch.manual_seed(0)
    fresh = parsed(parser, "network_def")
    checkpoint = os.path.join(out_dir, "pretrain", "models", "model.pt")
    trained.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    record = {"checkpoint": checkpoint, "views": len(views), "input": relative_spread(views)}
    for name, network in (("trained", trained), ("initial", fresh)):
        record[name] = stage_spreads(network.swinViT, views)
    write_json_atomic(record, os.path.join(out_dir, "pretrain", "encoder_collapse.json"))
    return record


if __name__ == "__main__":
    import fire

    fire.Fire(main)
