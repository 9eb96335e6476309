"""Train the nowcaster on a recorded corpus and write the package data file.

    python -m hybrid_lightning.nowcast.train --corpus .cache/nowcast/corpus \
        [--out hybrid_lightning/nowcast/nowcaster.pt] [--spacing 32] [--epochs 4]

Samples: for every recorded task, window end and horizon, ``context`` snapshots ``spacing`` steps
apart and the entry's real displacement ``k`` steps later (``k`` from one observation stride up to
``4 x spacing``), all in units of the tensor's scale (see :mod:`hybrid_lightning.core.nowcaster`).
Every fifth task is held out; the report scores the model on them against two references, in the
same scaled units: ``null`` (predict no change) and ``trend`` (carry on at the context's mean
velocity). ``skill = 1 - MSE / MSE(null)``: 0 is no better than standing still, 1 is perfect.
Deterministic for a given corpus; about 75 seconds on one CPU thread for the default corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.core.nowcaster import _EPS, _MAX_OUT, CONTEXT, NowcasterNet, entry_neurons, featurize, n_features

HORIZONS = 16  # in recorded intervals: 1 .. 16 x record_every steps


def samples(rec: dict[str, Any], spacing: int, context: int, rng: random.Random, per_tensor: int,
            neuron: bool, window_every: int = 2, horizons_per_window: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Features, scaled targets and horizons (in steps) drawn from one recorded task."""
    every = rec["record_every"]
    pr = spacing // every
    span = (context - 1) * pr
    n_rec = rec["snaps"][0].shape[0]
    xs, ys, ks = [], [], []
    for end in range(span, n_rec - 1, window_every):
        for k in rng.sample(range(1, HORIZONS + 1), horizons_per_window):
            if end + k >= n_rec:
                continue
            for t, (snaps, shape) in enumerate(zip(rec["snaps"], rec["shapes"])):
                n = snaps.shape[1]
                pick = torch.tensor(rng.sample(range(n), min(n, per_tensor)))
                hist = snaps[end - span:end + 1:pr][:, pick]
                paths = None
                if neuron:
                    row, col = entry_neurons(rec["index"][t][pick], shape)
                    window = slice(end - span, end + 1, pr)
                    paths = (rec["rows"][t][window][:, row], rec["cols"][t][window][:, col])
                feats, scale = featurize(hist, k * every / spacing, len(shape) <= 1, paths)
                if float(scale) <= _EPS:  # a frozen tensor: the model is never asked about it
                    continue
                target = ((snaps[end + k, pick] - snaps[end, pick]) / scale).clamp(-_MAX_OUT, _MAX_OUT)
                xs.append(feats)
                ys.append(target)
                ks.append(torch.full((len(pick),), k * every))
    if not xs:
        return torch.empty(0, n_features(context, neuron)), torch.empty(0), torch.empty(0)
    return torch.cat(xs), torch.cat(ys), torch.cat(ks)


def load_corpus(corpus: Path, spacing: int, context: int, per_tensor: int, seed: int,
                neuron: bool) -> dict[str, Any]:
    files = sorted(corpus.glob("task_*.pt"))
    if not files:
        raise FileNotFoundError(f"no task_*.pt in {corpus}; run python -m hybrid_lightning.nowcast.corpus first")
    rng = random.Random(seed)
    parts: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {"train": [], "heldout": []}
    families: dict[str, int] = {}
    held_by_family: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for f in files:
        rec = torch.load(f, weights_only=False)
        split = "heldout" if rec["spec"]["index"] % 5 == 4 else "train"
        chunk = samples(rec, spacing, context, rng, per_tensor, neuron)
        parts[split].append(chunk)
        fam = rec["spec"]["family"]
        families[fam] = families.get(fam, 0) + 1
        if split == "heldout":
            held_by_family.setdefault(fam, []).append(chunk)
    out: dict[str, Any] = {"tasks": len(files), "families": families}
    for split, chunks in parts.items():
        out[split] = tuple(torch.cat([c[i] for c in chunks]) for i in range(3))
    out["heldout_by_family"] = {fam: tuple(torch.cat([c[i] for c in chunks]) for i in range(3))
                                for fam, chunks in sorted(held_by_family.items())}
    return out


def _flip(x: Tensor, y: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Sign symmetry: negating an entry's whole path negates its future (data augmentation)."""
    sign = torch.where(torch.rand(len(y)) < 0.5, -1.0, 1.0)
    x = x.clone()
    x[:, :context] *= sign[:, None]  # the relative path and the magnitude
    x[:, context + 3:] *= sign[:, None]  # the neuron paths, if any
    return x, y * sign


def evaluate(net: NowcasterNet, x: Tensor, y: Tensor, k: Tensor, context: int, spacing: int) -> dict[str, Any]:
    with torch.no_grad():
        pred = torch.cat([net(c) for c in x.split(1 << 16)])
    # trend: mean velocity over the context, carried k steps: rel[:, 0] = (h_0 - h_now) / s
    trend = (-x[:, 0] / ((context - 1) * spacing) * k).clamp(-_MAX_OUT, _MAX_OUT)
    null = y.pow(2).mean()
    res: dict[str, Any] = {"samples": len(y)}
    for name, p in (("model", pred), ("trend", trend)):
        res[f"skill_{name}"] = float(1 - (p - y).pow(2).mean() / null)
    for lo, hi in ((1, 32), (33, 64), (65, 128)):
        m = (k >= lo) & (k <= hi)
        if m.any():
            res[f"skill_model_k{lo}-{hi}"] = float(1 - (pred[m] - y[m]).pow(2).mean() / y[m].pow(2).mean())
            res[f"skill_trend_k{lo}-{hi}"] = float(1 - (trend[m] - y[m]).pow(2).mean() / y[m].pow(2).mean())
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path(".cache/nowcast/corpus"))
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("nowcaster.pt"))
    p.add_argument("--spacing", type=int, default=32, help="steps between the snapshots the model sees")
    p.add_argument("--context", type=int, default=CONTEXT)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--neuron", action=argparse.BooleanOptionalAction, default=True,
                   help="neuron-aware features (row and column mean paths); --no-neuron: per-parameter only")
    p.add_argument("--per-tensor", type=int, default=32, help="entries sampled per tensor and window")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1 (the report scores the model after the last epoch)")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    data = load_corpus(args.corpus, args.spacing, args.context, args.per_tensor, args.seed, args.neuron)
    x, y, k = data["train"]
    print(f"{data['tasks']} tasks {data['families']}: {len(y)} training samples, {len(data['heldout'][1])} held out "
          f"({time.perf_counter() - t0:.0f} s to load)", flush=True)
    net = NowcasterNet(args.context, args.hidden, args.neuron)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    n_batches = (len(y) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * n_batches)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y))
        total = 0.0
        for b in range(n_batches):
            i = perm[b * args.batch_size:(b + 1) * args.batch_size]
            xb, yb = _flip(x[i], y[i], args.context)
            loss = (net(xb) - yb).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        held = evaluate(net, *data["heldout"], args.context, args.spacing)
        print(f"epoch {epoch + 1}/{args.epochs}: train mse {total / n_batches:.4f}, held-out skill "
              f"{held['skill_model']:+.4f} (trend {held['skill_trend']:+.4f})", flush=True)
    seconds = time.perf_counter() - t0
    by_family = {fam: {k: v for k, v in evaluate(net, *d, args.context, args.spacing).items()
                       if k in ("samples", "skill_model", "skill_trend")}
                 for fam, d in data["heldout_by_family"].items()}
    report = {"neuron": args.neuron, "corpus_tasks": data["tasks"], "families": data["families"],
              "train_samples": len(y), "train_seconds": round(seconds, 1), "heldout": held,
              "heldout_by_family": by_family}
    torch.save({"state_dict": net.state_dict(), "context": args.context, "hidden": args.hidden, "neuron": args.neuron,
                "spacing": args.spacing, "version": 1, "report": json.dumps(report)}, args.out)
    print(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {seconds:.0f} s")
    return report


if __name__ == "__main__":
    main()
