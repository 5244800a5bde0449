"""Benchmark: samples/s of saeft's Top-K SAE training against a plain dense implementation.

Same data, same initial weights, same hyper-parameters (AdamW, lr, unit-norm decoder with the
parallel gradient removed, no AuxK), side by side in one run: each batch trains both models,
each step timed on its own, so load from other processes hits both alike. The dense baseline is
the public reference recipe: dense pre-activations, ``topk`` scattered into a dense code, a dense
decoder matmul, autograd through all of it. saeft differentiates only the kept entries (sparse
encoder backward, ``embedding_bag`` decode). Prints samples/s, the ratio and both held-out FVUs.

    PYTHONPATH=. python bench/sae_train.py                 # d=512, expansion 32, k=32, batch 4096
    PYTHONPATH=. python bench/sae_train.py --steps 5 --d 64  # quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from saeft.sae import SAETrainConfig, TopKSAE, Trainer

log = logging.getLogger("bench.sae_train")


def synthetic_batches(d: int, n_atoms: int, active: int, batch: int, count: int, seed: int):
    """``count`` batches of unit-norm embeddings: sparse non-negative mixtures of random atoms
    plus noise, a stand-in for CLIP embeddings with known sparse structure."""
    generator = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, d, generator=generator), dim=-1)
    out = []
    for _ in range(count):
        idx = torch.randint(n_atoms, (batch, active), generator=generator)
        weights = torch.rand(batch, active, generator=generator)
        x = F.embedding_bag(idx, atoms, mode="sum", per_sample_weights=weights)
        x = x + 0.05 * torch.randn(batch, d, generator=generator)
        out.append(F.normalize(x, dim=-1))
    return out


def dense_step(sae: TopKSAE, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    """One step of the plain dense recipe (as in the public reference code)."""
    pre = (batch - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    values, indices = pre.topk(sae.k, dim=-1)
    code = torch.zeros_like(pre).scatter(-1, indices, values)
    recon = code @ sae.W_dec.T + sae.b_pre
    loss = F.mse_loss(recon, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad_()
    optimizer.step()
    sae.normalize_decoder_()


@torch.no_grad()
def fvu(sae: TopKSAE, data: torch.Tensor) -> float:
    """Held-out FVU with the dense forward (the same evaluation for both models)."""
    code = topk_dense(sae, data)
    recon = code @ sae.W_dec.T + sae.b_pre
    return ((recon - data).double().pow(2).sum() / (data.double() - data.double().mean(0)).pow(2).sum()).item()


def topk_dense(sae: TopKSAE, data: torch.Tensor) -> torch.Tensor:
    pre = (data - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    values, indices = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    d, n_features = args.d, args.d * args.expansion
    total = args.warmup + args.steps
    batches = synthetic_batches(d, 4 * n_features, 8, args.batch, total + 1, args.seed)
    heldout = batches.pop()

    cfg = SAETrainConfig(
        expansion=args.expansion, k=args.k, normalize="none", lr=args.lr, warmup_steps=0,
        lr_decay="none", auxk_alpha=0.0, seed=args.seed,
    )
    trainer = Trainer("saeft", cfg, d, total_steps=total, n_train=total * args.batch)
    with torch.no_grad():
        trainer.sae.b_pre.copy_(torch.cat(batches).mean(dim=0))
    trainer.sae.b_enc.requires_grad_(False)
    dense = copy.deepcopy(trainer.sae)
    dense_opt = torch.optim.AdamW(
        [p for p in dense.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    trainer.sae.train()
    dense.train()

    times = {"dense": [], "saeft": []}
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        dense_step(dense, dense_opt, batch)
        mid = time.perf_counter()
        trainer.step(batch)
        end = time.perf_counter()
        if step >= args.warmup:
            times["dense"].append(mid - start)
            times["saeft"].append(end - mid)
        log.info("step %d/%d dense %.2fs saeft %.2fs", step + 1, total, mid - start, end - mid)

    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    fvus = {"dense": fvu(dense, heldout), "saeft": fvu(trainer.sae, heldout)}
    ratio = rate["saeft"] / rate["dense"]
    rel = abs(fvus["saeft"] - fvus["dense"]) / fvus["dense"]
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"d={d} n_features={n_features} k={args.k} batch={args.batch} steps={args.steps} "
          f"(median step time over the timed steps)")
    print("| implementation | samples/s | held-out FVU |")
    print("|---|---|---|")
    for name in ("dense", "saeft"):
        print(f"| {name} | {rate[name]:.0f} | {fvus[name]:.4f} |")
    print(f"ratio saeft/dense: {ratio:.2f}x; FVU relative difference: {100 * rel:.3f}%")


if __name__ == "__main__":
    main()
