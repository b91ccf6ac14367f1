"""docs/architecture.md's "How to add a model", step by step, with a tiny network, grey and colour: if
a step is missing from the doc (or the library needs one more), this test fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pixelcnn import likelihood
from pixelcnn.ops.rules import validate
from pixelcnn.pixelcnn_net import ClassBias, MaskedConv2d, spatial
from pixelcnn.training import build_network
from test_cli import ROOT

DOC = ROOT / "docs" / "architecture.md"


class TinyNet(nn.Module):
    """Step 1: a network with `levels`, `num_classes`, `image_channels` and its own option (`width`):
    (B, C, H, W) `level / levels` -> (B, C * levels, H, W) logits, each pixel seeing only those before it."""

    def __init__(self, levels: int = 4, num_classes: int = 0, image_channels: int = 1, width: int = 6):
        super().__init__()
        self.levels, self.num_classes, self.image_channels = levels, num_classes, image_channels
        self.first = MaskedConv2d(image_channels, width, 3, "A", image_channels)  # hides the pixel itself
        self.cond = ClassBias(num_classes, width)
        self.to_logits = MaskedConv2d(width, image_channels * levels, 1, "B", image_channels)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.to_logits(torch.relu(self.first(x) + spatial(self.cond(labels))))


@pytest.fixture
def tiny_conf(tmp_path: Path, monkeypatch) -> Path:
    """Steps 2 and 3: the class registered in ARCHITECTURES, and conf/model/tiny.yaml (a copy of conf/)."""
    monkeypatch.setitem(likelihood.ARCHITECTURES, "tiny", TinyNet)
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "model" / "tiny.yaml").write_text(
        "_target_: pixelcnn.module.ImageModule  # the LightningModule that trains every network\n"
        "arch: tiny                   # the key of ARCHITECTURES\n"
        "levels: ${data.levels}       # tied to the data\n"
        "image_size: ${data.image_size}\n"
        "num_classes: 0               # 0: unconditional\n"
        "image_channels: ${data.channels}\n"
        "ema_decay: 0.0               # the module's weight average (0: none)\n"
        "width: 6                     # TinyNet's own option\n")
    return conf


def test_the_doc_names_each_step():
    text = DOC.read_text()
    for step in ("ARCHITECTURES", "conf/model/<name>.yaml", "image_channels", "start_incremental", "method=naive"):
        assert step in text, f"docs/architecture.md's How to add a model does not mention {step}"


@pytest.mark.parametrize("channels", [1, 3])
def test_a_new_network_trains_scores_and_samples(tiny_conf: Path, tmp_path: Path, channels: int):
    with initialize_config_dir(version_base="1.3", config_dir=str(tiny_conf)):
        cfg = compose("train", overrides=["model=tiny", f"data.channels={channels}", "model.width=9"])
    validate(cfg, "train")  # step 4: its options pass the config's checks (an unknown one would not)
    net = build_network(cfg)
    assert isinstance(net, TinyNet) and net.first.out_channels == 9 and net.image_channels == channels

    # Causal: the logits of pixel p depend on no input pixel at or after p (channels: only on earlier ones).
    x = torch.rand(1, channels, 5, 5, requires_grad=True)
    net(x)[0, :, 2, 2].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0  # (H, W)
    assert not seen[2, 3:].any() and not seen[3:].any()

    from pixelcnn.module import ImageModule
    module = ImageModule(arch="tiny", levels=4, image_size=5, image_channels=channels, net=net, width=9,
                         optim={"lr": 1e-2, "weight_decay": 0.0, "scheduler": {"name": "none"}})
    images = torch.randint(4, (16, channels, 5, 5), dtype=torch.uint8)
    before = module.mean_bits_per_dim(images, torch.zeros(16, dtype=torch.long)).item()
    loader = DataLoader(TensorDataset(images.repeat(20, 1, 1, 1), torch.zeros(320, dtype=torch.long)), batch_size=16)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, train_dataloaders=loader)
    assert module.mean_bits_per_dim(images, torch.zeros(16, dtype=torch.long)).item() < before

    # A checkpoint's hyperparameters rebuild it (what sample.py and evaluate.py load), and the naive sampler draws.
    rebuilt = likelihood.ImageModel.from_hparams(dict(module.hparams))
    rebuilt.load_state_dict({k: v for k, v in module.state_dict().items() if k.startswith("net.")})
    drawn = rebuilt.sample(3, seed=0, method="naive")
    assert drawn.shape == ((3, 5, 5) if channels == 1 else (3, channels, 5, 5)) and int(drawn.max()) < 4
