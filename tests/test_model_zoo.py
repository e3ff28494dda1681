"""Distribution the Model Zoo way: its CI checks through MONAI's public API, large files and bundle zips over HTTP."""

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
from conftest import BUNDLES, REPO, load_bundle_scripts, run_bundle_args, verify_bundle_metadata
from monai.bundle import ckpt_export, verify_net_in_out
from test_bundle_conventions import BUNDLE_NAMES, SEGMENTATION_BUNDLES

sys.path.insert(0, str(REPO / "ci"))
import synthetic_ct  # noqa: E402
from package_bundle import package  # noqa: E402

IN_OUT = {"swin_unetr_btcv": (1, 14), "swin_unetr_msd": (1, 2), "swin_unetr_pretrain": (1, 1)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_is_valid_and_versioned(bundle, tmp_path):
    meta_file = BUNDLES / bundle / "configs" / "metadata.json"
    verify_bundle_metadata(meta_file, tmp_path)
    meta = json.loads(meta_file.read_text())
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_parsed_metadata_keeps_the_required_packages(bundle):
    """MONAI 1.6 renames a deprecated `optional_packages_version` to `required_packages_version` when it parses
    metadata, replacing the real list; MONAI Label and the bundle tools read the parsed one."""
    import warnings

    from monai.bundle import ConfigParser

    meta_file = BUNDLES / bundle / "configs" / "metadata.json"
    parser = ConfigParser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warning MONAI gives for the old key fails the test
        parser.read_meta(str(meta_file))
        parsed = parser.get_parsed_content("_meta_#required_packages_version")
    assert parsed == json.loads(meta_file.read_text())["required_packages_version"]
    assert {"nibabel", "pytorch-ignite", "einops"} <= set(parsed)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_large_files_entries_are_well_formed(bundle):
    """Paths stay inside the bundle, URLs are http(s), hashes name their type and have its length. The BTCV bundle
    ships published weights, so the Model Zoo's `models/model.pt` comes through large_files.yml with an md5."""
    import yaml

    entries = yaml.safe_load((BUNDLES / bundle / "large_files.yml").read_text())["large_files"]
    assert entries
    for entry in entries:
        assert not entry["path"].startswith(("/", "..")) and ".." not in entry["path"].split("/")
        assert entry["url"].startswith(("https://", "http://"))
        if entry.get("hash_val"):
            assert len(entry["hash_val"]) == {"md5": 32, "sha256": 64}[entry["hash_type"]]
    if bundle == "swin_unetr_btcv":
        assert [e["hash_type"] for e in entries if e["path"] == "models/model.pt"] == ["md5"]


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_network_matches_metadata(bundle):
    configs = BUNDLES / bundle / "configs"
    verify_net_in_out(
        net_id="network_def", meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
        device="cpu", feature_size=12, **{"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64, 64],
                                          "_meta_#network_data_format#outputs#pred#spatial_shape": [64, 64, 64]},
    )  # fmt: skip


@pytest.mark.parametrize("bundle", ["swin_unetr_msd", "swin_unetr_pretrain"])  # BTCV's: test_btcv_bundle
def test_torchscript_export_loads(bundle, tmp_path):
    """ckpt_export of `network_def` (traced: SwinUNETR does not script) gives a TorchScript file that loads and runs.
    The pre-training network returns a dict of head outputs, which tracing accepts with strict=False; MONAI's
    verify_net_in_out reads one output tensor, so it checks only the segmentation bundles (above)."""
    configs = BUNDLES / bundle / "configs"
    config = configs / ("train.json" if bundle == "swin_unetr_pretrain" else "inference.json")
    load_bundle_scripts(bundle)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["feature_size"] = 12
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    in_channels, out_channels = IN_OUT[bundle]
    ckpt_export(
        net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(configs / "metadata.json"), config_file=str(config), use_trace=True,
        input_shape=[1, in_channels, 64, 64, 64], feature_size=12, converter_kwargs={"strict": False},
    )  # fmt: skip
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        out = loaded(torch.rand(1, in_channels, 64, 64, 64))
    out = out["reconstruction"] if isinstance(out, dict) else out
    assert out.shape == (1, out_channels, 64, 64, 64)


def bundle_copy_with_large_file(tmp_path, url: str, hash_val: str, path: str = "models/model.pt"):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLES / "swin_unetr_btcv", bundle, ignore=shutil.ignore_patterns("eval", "*.pt", "__pycache__"))
    (bundle / "large_files.yml").write_text(
        f'large_files:\n  - path: "{path}"\n    url: "{url}"\n    hash_val: "{hash_val}"\n    hash_type: "md5"\n'
    )
    return bundle


def download_large_files(bundle) -> subprocess.CompletedProcess:
    return run_bundle_args(["download_large_files", "--bundle_path", str(bundle)])


@pytest.fixture(scope="module")
def weight_file(server):
    root, url = server
    torch.save({"w": torch.arange(1000.0)}, root / "weights.pt")
    return f"{url}/weights.pt", hashlib.md5((root / "weights.pt").read_bytes()).hexdigest()


def test_large_file_arrives_and_verifies(weight_file, tmp_path):
    url, md5 = weight_file
    bundle = bundle_copy_with_large_file(tmp_path, url, md5)
    proc = download_large_files(bundle)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hashlib.md5((bundle / "models" / "model.pt").read_bytes()).hexdigest() == md5
    assert torch.equal(torch.load(bundle / "models" / "model.pt", weights_only=True)["w"], torch.arange(1000.0))


def test_large_file_with_wrong_hash_is_refused_and_not_kept(weight_file, tmp_path):
    url, _ = weight_file
    bundle = bundle_copy_with_large_file(tmp_path, url, "0" * 32)
    proc = download_large_files(bundle)
    assert proc.returncode != 0
    assert "hash check of downloaded file failed" in proc.stderr
    assert not (bundle / "models" / "model.pt").exists()


def test_large_file_path_escaping_the_bundle_is_refused(weight_file, tmp_path):
    url, md5 = weight_file
    bundle = bundle_copy_with_large_file(tmp_path, url, md5, path="../escaped.pt")
    proc = download_large_files(bundle)
    assert proc.returncode != 0
    assert "escaped.pt" in proc.stderr
    assert not (tmp_path / "escaped.pt").exists()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_package_holds_the_bundle_and_nothing_else(bundle, tmp_path):
    source = tmp_path / bundle
    shutil.copytree(BUNDLES / bundle, source, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "eval").mkdir(exist_ok=True)
    (source / "eval" / "events.out.tfevents.1.vm").write_text("log")
    (source / "models" / "model.pt").write_bytes(b"weights")
    zip_path = package(str(source), str(tmp_path / "dist"))
    version = json.loads((source / "configs" / "metadata.json").read_text())["version"]
    assert zip_path == str(tmp_path / "dist" / f"{bundle}_v{version}.zip")
    names = zipfile.ZipFile(zip_path).namelist()
    assert all(n.startswith(f"{bundle}/") for n in names)
    for required in ("configs/metadata.json", "LICENSE", "docs/README.md", "large_files.yml", "configs/train.json"):
        assert f"{bundle}/{required}" in names
    assert not [n for n in names if "/eval/" in n or n.endswith(".pt") or "tfevents" in n or "__pycache__" in n]


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_downloaded_zip_runs_inference_outside_the_repository(bundle, server, tmp_path):
    """Package, serve, `monai.bundle.download(url=...)`, then infer from the extracted copy with the working folder
    outside the repository."""
    from monai.bundle import download
    from monai.networks.nets import SwinUNETR

    root, url = server
    zip_path = package(str(BUNDLES / bundle), str(root))
    download(name=bundle, bundle_dir=str(tmp_path / "downloaded"), url=f"{url}/{zip_path.rsplit('/', 1)[-1]}")
    copy = tmp_path / "downloaded" / bundle
    assert (copy / "configs" / "inference.json").is_file()
    in_channels, out_channels = IN_OUT[bundle]
    torch.save(SwinUNETR(in_channels, out_channels, feature_size=12).state_dict(), copy / "models" / "model.pt")
    image, _, affine = synthetic_ct.make_case(seed=2, shape=(60, 56, 24))
    (tmp_path / "images").mkdir()
    synthetic_ct.save_nifti(image, affine, str(tmp_path / "images" / "case.nii.gz"))
    args = ["run", "--config_file", str(copy / "configs" / "inference.json"),
            "--dataset_dir", str(tmp_path / "images"), "--output_dir", str(tmp_path / "pred"),
            "--feature_size", "12", "--roi_size", "[64,64,64]", "--num_workers", "0"]  # fmt: skip
    proc = run_bundle_args(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "pred" / "case_seg.nii.gz").is_file()
