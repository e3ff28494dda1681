"""`ci/ssl_side_by_side.py`'s own parts: running released code that hard-codes CUDA on the CPU, and carrying the
bundle's initial weights into a network whose parameter names and shapes differ in places."""

import sys
import textwrap

import pytest
import ssl_side_by_side
import torch

FAKE_RELEASE = {  # the released modules' CUDA habits, in files laid out as in research-contributions
    "models/ssl_head.py": "import torch\nSSLHead = torch.nn.Linear\n",
    "losses/loss.py": """
        import torch
        class Loss(torch.nn.Module):
            def __init__(self, batch_size, args):
                super().__init__()
                self.ce = torch.nn.CrossEntropyLoss().cuda()
                self.register_buffer("temp", torch.tensor(0.5).to(torch.device(f"cuda:{args.local_rank}")))
    """,
    "utils/ops.py": """
        import torch
        def rot_rand(args, x):
            return x, torch.zeros(len(x)).long().to(torch.device(f"cuda:{args.local_rank}"))
        def aug_rand(args, x):
            return x + torch.empty(x.shape, device=args.local_rank).fill_(1.0)
    """,
    "optimizers/lr_scheduler.py": "WarmupCosineSchedule = object\n",
}


@pytest.fixture()
def fake_release(tmp_path, monkeypatch):
    folder = tmp_path / "SwinUNETR" / "Pretrain"
    for name, text in FAKE_RELEASE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))
    monkeypatch.setattr(torch.nn.Module, "cuda", torch.nn.Module.cuda)  # restored after the test
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in ("models", "losses", "utils", "optimizers")]:
        del sys.modules[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU substitution, made only without CUDA")
def test_released_code_that_hard_codes_cuda_runs_on_the_cpu(fake_release):
    released = ssl_side_by_side.cpu_released_modules(str(fake_release))
    args = type("Args", (), {"local_rank": "cpu"})()
    loss = released.Loss(2, args)
    assert loss.temp.device.type == "cpu" and loss.ce.__class__.__name__ == "CrossEntropyLoss"
    x = torch.zeros(3, 1, 4, 4, 4)
    _, labels = released.rot_rand(args, x)
    assert labels.device.type == "cpu" and labels.tolist() == [0, 0, 0]
    assert torch.equal(released.aug_rand(args, x), torch.ones_like(x))


def test_released_checkout_that_is_not_one_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="research-contributions"):
        ssl_side_by_side.cpu_released_modules(str(tmp_path))


def test_initial_weights_carry_over_where_names_and_shapes_agree():
    """Prefixes are renamed (the bundle's `inpainting_head.` is the released `conv.`); a tensor whose shape differs
    keeps the target's own initialisation and is listed."""
    source = {
        "swinViT.w": torch.ones(2, 3),
        "inpainting_head.0.weight": torch.ones(4),
        "inpainting_head.1.weight": torch.ones(5),
    }
    target = torch.nn.Module()
    target.swinViT = torch.nn.Module()
    target.swinViT.w = torch.nn.Parameter(torch.zeros(2, 3))
    target.conv = torch.nn.ModuleList([torch.nn.Linear(1, 4, bias=False), torch.nn.Linear(1, 6, bias=False)])
    target.conv[0].weight = torch.nn.Parameter(torch.zeros(4))
    own = ssl_side_by_side.copy_matching(source, target, {"inpainting_head.": "conv."})
    assert own == ["conv.1.weight"]
    assert torch.equal(target.swinViT.w, torch.ones(2, 3)) and torch.equal(target.conv[0].weight, torch.ones(4))
    assert not torch.equal(target.conv[1].weight, torch.ones(6, 1))
