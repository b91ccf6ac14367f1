"""Why does the gated model learn slower than the UvA tutorial's? Train its variants side by side.

Issue 28's ablation: the Gated PixelCNN at the CPU preset's size (experiment=quick_gated: 32 channels, 4 layers),
with each candidate change alone and all together, on the same batches in the same order, fp32, Adam:
  old        the defaults before the ablation: dilations [1], input level / L in [0, 1), ReLU-1x1-ReLU-1x1 head
  dilated    + model.dilations=[1, 2, 1, 4] (the receptive field: the report counts the unseen pixels)
  centred    + model.centre_input=true (the input in [-1, 1])
  elu_head   + model.head=elu (ELU then one 1x1: no ReLU drops the stream's negative half)
  all        the three together
  all_lr5e-4 the three together at lr 5e-4 instead of 1e-3
Each variant's test bits/dim (exact, all 10,000 test images) after every epoch, and its training img/s (the
variants take turns on each batch, so every one runs under the same machine load). Results go to a JSON file per
seed, so that a long run can be stopped and resumed seed by seed; `--report` prints the markdown table of
docs/gated_ablation.md from them (mean ± std over the seeds).

    python scripts/gated_ablation.py --seeds 0 1 2 --epochs 2           # ~80 min on 2 CPU cores
    python scripts/gated_ablation.py --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from figures import unseen_pairs  # scripts/figures.py: the README's receptive-field counts

from pixelcnn.data import setup_datamodule
from pixelcnn.likelihood import ImageModel

OLD = {"dilations": [1], "centre_input": False, "head": "relu"}
NEW = {"dilations": [1, 2, 1, 4], "centre_input": True, "head": "elu"}
VARIANTS = {  # name: (network options over the preset's size, learning rate)
    "old": (OLD, 1e-3),
    "dilated": ({**OLD, "dilations": NEW["dilations"]}, 1e-3),
    "centred": ({**OLD, "centre_input": True}, 1e-3),
    "elu_head": ({**OLD, "head": "elu"}, 1e-3),
    "all": (NEW, 1e-3),
    "all_lr5e-4": (NEW, 5e-4),
}


def run_seed(seed: int, epochs: int, channels: int, layers: int, batch_size: int, data) -> dict:
    images, labels = data.train_set
    test_images = data.test_set[0]
    models, optimizers, seconds = {}, {}, {}
    for name, (options, lr) in VARIANTS.items():
        torch.manual_seed(seed)
        models[name] = ImageModel("gated", levels=4, image_size=16, channels=channels, layers=layers, **options)
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=lr)
        seconds[name] = 0.0
    result = {"seed": seed, "epochs": epochs, "channels": channels, "layers": layers, "batch_size": batch_size,
              "threads": torch.get_num_threads(), "variants": {}}
    for name, model in models.items():
        result["variants"][name] = {"parameters": sum(p.numel() for p in model.parameters()), "test_bpd": []}
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            x, y = images[batch], labels[batch]
            for name, model in models.items():
                began = time.perf_counter()
                loss = model.mean_bits_per_dim(x, y)
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                seconds[name] += time.perf_counter() - began
            seen += len(batch)
            if start // batch_size % 100 == 0:
                print(f"seed {seed} epoch {epoch + 1} batch {start // batch_size}: last loss {loss.item():.4f}",
                      flush=True)
        for name, model in models.items():
            bpd = float(model.image_bits_per_dim(test_images).mean())
            result["variants"][name]["test_bpd"].append(bpd)
            result["variants"][name]["img_per_s"] = seen / seconds[name]
            print(f"seed {seed} epoch {epoch + 1} {name}: test {bpd:.4f} bits/dim, {seen / seconds[name]:.0f} img/s",
                  flush=True)
    return result


def report(out: Path) -> str:
    runs = [json.loads(path.read_text()) for path in sorted(out.glob("seed*.json"))]
    if not runs:
        raise SystemExit(f"no results in {out}: run the ablation first")
    first = runs[0]
    lines = [f"{len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)}), {first['epochs']} epochs, "
             f"{first['channels']} channels x {first['layers']} layers, batch {first['batch_size']}, "
             f"{first['threads']} threads", "",
             "| variant | parameters | unseen (pixel, earlier pixel) pairs | test bits/dim (mean ± std) | vs old "
             "| img/s (best seed) |",
             "|---|---|---|---|---|---|"]
    old = statistics.mean(r["variants"]["old"]["test_bpd"][-1] for r in runs)
    for name, (options, _) in VARIANTS.items():
        net = ImageModel("gated", levels=4, image_size=16, channels=first["channels"], layers=first["layers"],
                         **options).net
        unseen = unseen_pairs(net, 16)  # of 32,640 (output pixel, earlier pixel) pairs of a 16x16 image
        bpd = [r["variants"][name]["test_bpd"][-1] for r in runs]
        std = statistics.stdev(bpd) if len(bpd) > 1 else 0.0
        speed = max(r["variants"][name]["img_per_s"] for r in runs)  # other work only ever slows a seed down
        v = first["variants"][name]
        lines.append(f"| {name} | {v['parameters']:,} | {unseen:,} | {statistics.mean(bpd):.4f} ± "
                     f"{std:.4f} | {statistics.mean(bpd) - old:+.4f} | {speed:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32)  # experiment=quick_gated's
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("outputs/gated_ablation"))
    parser.add_argument("--report", action="store_true", help="print the table of the finished seeds")
    args = parser.parse_args()
    if args.report:
        print(report(args.out))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data = setup_datamodule(None, image_size=16, levels=4)
    for seed in args.seeds:
        result = run_seed(seed, args.epochs, args.channels, args.layers, args.batch_size, data)
        (args.out / f"seed{seed}.json").write_text(json.dumps(result, indent=1))
    print(report(args.out))


if __name__ == "__main__":
    main()
