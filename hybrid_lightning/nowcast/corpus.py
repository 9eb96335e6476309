"""Trajectory corpus for the meta-trained nowcaster: many small generated tasks, recorded.

    python -m hybrid_lightning.nowcast.corpus [--out .cache/nowcast/corpus] [--tasks 240] [--first 0]

Each task is drawn deterministically from its index: a family (MLP classifying a Gaussian mixture,
CNN classifying generated gratings, tiny causal transformer on a random Markov-chain language),
width, depth, AdamW learning rate, weight decay, batch size, schedule (cosine or constant after a
linear warmup), length and seed. None of it resembles the benchmark workloads (teacher-student
regression, shifted image prototypes, Python source).

Every ``record_every`` optimizer steps the recorder stores, per parameter tensor, the values of a
fixed random subset of at most ``max_entries`` entries (the nowcaster is a per-parameter model, so
a subset is a fair sample), every neuron's mean incoming and outgoing weight (the inputs of the
neuron-aware features, ``core.nowcaster.neuron_means``), the mean training loss and the learning
rate. One ``.pt`` file per task; existing files are skipped, so an interrupted run resumes where it
stopped. Pure torch, one thread, a few seconds per task: the default 240 tasks took 21 minutes on a
2-core x86_64 CPU (357 MB).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hybrid_lightning.core.nowcaster import neuron_means

FAMILIES = ("mlp_mixture", "cnn_gratings", "tf_markov")
RECORD_EVERY = 8  # steps between recorded snapshots (= the engine's default observation stride)


def draw_task(index: int) -> dict[str, Any]:
    """Hyperparameters of task ``index`` (deterministic)."""
    r = random.Random(1_000_003 * index + 17)
    fam = FAMILIES[index % len(FAMILIES)]
    spec: dict[str, Any] = {
        "index": index, "family": fam, "seed": r.randrange(2**31),
        "lr": 10 ** r.uniform(math.log10(5e-4), math.log10(1e-2)),
        "weight_decay": r.choice([0.0, 0.01, 0.1]),
        "batch_size": r.choice([32, 64, 128]),
        "schedule": r.choice(["cosine", "cosine", "constant"]),
        "steps": r.choice([480, 640, 800, 960]),
    }
    if fam == "mlp_mixture":
        spec.update(d_in=r.choice([8, 16, 32]), classes=r.choice([4, 8, 16]), width=r.choice([64, 128, 256]),
                    depth=r.choice([2, 3]), noise=r.uniform(0.5, 1.5))
    elif fam == "cnn_gratings":
        spec.update(size=r.choice([12, 16]), classes=r.choice([4, 6, 8]), channels=r.choice([8, 16, 24]),
                    noise=r.uniform(0.3, 1.0))
    else:
        spec.update(vocab=r.choice([16, 24, 32]), d_model=r.choice([32, 48, 64]), layers=r.choice([1, 2]),
                    seq=32, branching=r.choice([2, 3, 4]))
    return spec


# ---------------------------------------------------------------------------- tasks
class _Tiny(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))


def build(spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Model and a ``batch(generator) -> loss-closure input`` sampler for one task."""
    g = torch.Generator().manual_seed(spec["seed"])
    fam = spec["family"]
    if fam == "mlp_mixture":
        d, k = spec["d_in"], spec["classes"]
        centers = torch.randn(k * 2, d, generator=g) * 2.0  # two clusters per class
        layers: list[nn.Module] = []
        width_in = d
        for _ in range(spec["depth"]):
            layers += [nn.Linear(width_in, spec["width"]), nn.ReLU()]
            width_in = spec["width"]
        model = nn.Sequential(*layers, nn.Linear(width_in, k))

        def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
            c = torch.randint(0, 2 * k, (spec["batch_size"],), generator=gen)
            x = centers[c] + spec["noise"] * torch.randn(len(c), d, generator=gen)
            return x, c % k
    elif fam == "cnn_gratings":
        s, k, ch = spec["size"], spec["classes"], spec["channels"]
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        model = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                              nn.Flatten(), nn.Linear(8 * ch, k))

        def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
            n = spec["batch_size"]
            y = torch.randint(0, k, (n,), generator=gen)
            angle = math.pi * y / k + 0.15 * torch.randn(n, generator=gen)
            freq = 0.6 + 0.3 * torch.rand(n, generator=gen)
            phase = 2 * math.pi * torch.rand(n, generator=gen)
            proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
            img = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
            img = img + spec["noise"] * torch.randn(n, s, s, generator=gen)
            return img[:, None], y
    else:
        v, seq = spec["vocab"], spec["seq"]
        nxt = torch.stack([torch.randperm(v, generator=g)[: spec["branching"]] for _ in range(v)])  # [v, b]
        model = _Tiny(v, spec["d_model"], spec["layers"], seq)

        def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
            n = spec["batch_size"]
            toks = torch.empty(n, seq + 1, dtype=torch.long)
            toks[:, 0] = torch.randint(0, v, (n,), generator=gen)
            for t in range(seq):
                pick = torch.randint(0, spec["branching"], (n,), generator=gen)
                toks[:, t + 1] = nxt[toks[:, t], pick]
            return toks[:, :-1], toks[:, 1:]
    return model, batch


def _loss(model: nn.Module, xy: tuple[Tensor, Tensor]) -> Tensor:
    out = model(xy[0])
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), xy[1].reshape(-1))


def lr_factor(step: int, steps: int, schedule: str) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def record_task(spec: dict[str, Any], max_entries: int = 512) -> dict[str, Any]:
    """Train one task with AdamW and return its recording."""
    torch.manual_seed(spec["seed"])
    model, batch = build(spec)
    names, params = zip(*[(n, p) for n, p in model.named_parameters()])
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    idx = [torch.randperm(p.numel(), generator=gen)[:max_entries].sort().values for p in params]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
    steps = spec["steps"]
    snaps: list[list[Tensor]] = [[] for _ in params]
    rows: list[list[Tensor]] = [[] for _ in params]
    cols: list[list[Tensor]] = [[] for _ in params]
    losses, lrs, acc = [], [], 0.0

    def snap() -> None:
        for i, p in enumerate(params):
            snaps[i].append(p.detach().reshape(-1)[idx[i]].clone())
            r, c = neuron_means(p.detach())
            rows[i].append(r)
            cols[i].append(c)

    snap()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = spec["lr"] * lr_factor(step, steps, spec["schedule"])
        loss = _loss(model, batch(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc += loss.item()
        if (step + 1) % RECORD_EVERY == 0:
            snap()
            losses.append(acc / RECORD_EVERY)
            lrs.append(opt.param_groups[0]["lr"])
            acc = 0.0
    return {"spec": spec, "names": list(names), "shapes": [tuple(p.shape) for p in params], "index": idx,
            "snaps": [torch.stack(s) for s in snaps], "rows": [torch.stack(r) for r in rows],
            "cols": [torch.stack(c) for c in cols], "loss": torch.tensor(losses), "lr": torch.tensor(lrs),
            "record_every": RECORD_EVERY}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".cache/nowcast/corpus"))
    p.add_argument("--tasks", type=int, default=240)
    p.add_argument("--first", type=int, default=0, help="index of the first task")
    p.add_argument("--max-entries", type=int, default=512, help="recorded entries per parameter tensor")
    args = p.parse_args(argv)
    from tqdm import tqdm  # lightning's dependency; only the command line needs it

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0, done = time.perf_counter(), 0
    bar = tqdm(range(args.first, args.first + args.tasks), desc="corpus", unit="task")
    for i in bar:
        path = args.out / f"task_{i:05d}.pt"
        if path.exists():
            continue
        rec = record_task(draw_task(i), args.max_entries)
        tmp = path.with_suffix(".tmp")
        torch.save(rec, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written task behind
        done += 1
        bar.set_postfix(family=rec["spec"]["family"], loss=f"{float(rec['loss'][-1]):.3f}")
    print(f"recorded {done} new tasks in {time.perf_counter() - t0:.0f} s into {args.out}")


if __name__ == "__main__":
    main()
