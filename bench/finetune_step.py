"""Step time and peak memory of every fine-tuning method relative to ``ft``.

Same model (the ResNet ``saeft-tiny-rn``, random weights: nothing is downloaded), same
batch, same data, one process per method so that peak memory is that method's own. Each child
times ``--steps`` full training steps (forward, loss, backward, clipping, AdamW, schedule) after
``--warmup`` untimed ones and reports the median step. Peak memory: on GPU the peak allocated by
torch; on CPU the peak resident set size minus the RSS before the model was built (so torch's own
import does not dilute the ratios).

    PYTHONPATH=. python bench/finetune_step.py [--batch 32] [--steps 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS: dict[str, tuple[str, str]] = {
    # row: (method, teacher)
    "ft": ("ft", "none"),
    "lp": ("lp", "none"),
    "l2sp": ("l2sp", "none"),
    "feat_mse (cache)": ("feat_mse", "cache"),
    "feat_mse (live)": ("feat_mse", "live"),
    "feat_l1 (cache)": ("feat_l1", "cache"),
    "ldifs (live)": ("ldifs", "live"),
    "flyp": ("flyp", "none"),
    "sae_sparse (cache)": ("sae_sparse", "cache"),
    "sae_add (cache)": ("sae_add", "cache"),
    "saeft (cache)": ("saeft", "cache"),
    "saeft (live)": ("saeft", "live"),
    "ft (repeat)": ("ft", "none"),  # measured last: the spread of the two ft rows is the noise
}
TARGETS = {"saeft (cache)": ("time", 1.10), "saeft (live)": ("time", 1.40)}
MEMORY_TARGET = ("saeft (cache)", 1.10)
ARCH = "saeft-tiny-rn"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(method: str, teacher: str, batch: int, steps: int, warmup: int, device_name: str, threads: int) -> dict:
    """Time one method's training step; runs in its own process."""
    import torch

    from saeft import finetune
    from saeft.data.registry import get_dataset
    from saeft.data.synthetic import CLASSNAMES
    from saeft.loss import Towers, build_context, method_loss
    from saeft.methods import get_method
    from saeft.models import ImageClassifier, create_clip
    from saeft.sae import TopKSAE
    from saeft.training import setup_torch, warmup_cosine

    setup_torch(0, threads)
    device = torch.device(device_name)
    n_classes, size = len(CLASSNAMES), 32
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) % n_classes
    base_rss = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()

    torch.manual_seed(0)
    clip = create_clip(ARCH).to(device)
    head = torch.randn(n_classes, clip.visual.output_dim, device=device)
    model = ImageClassifier(clip.visual, head)
    params = {"lp_epochs": 1} if method == "lpft" else {}
    cfg = finetune.FinetuneConfig(method=method, method_params=params, teacher="live" if teacher == "live" else "auto")
    hooks = get_method(method)
    trained: torch.nn.Module = model
    if hooks.build_trained is not None:  # e.g. flyp's two towers, with the synthetic world's class prompts
        trained = hooks.build_trained(Towers(clip=clip, arch=ARCH, classifier=model, spec=get_dataset("shapes"))).to(device)
    d = clip.visual.output_dim
    sae = TopKSAE(d, 4 * d, 32, generator=torch.Generator().manual_seed(0)).to(device) if "sae" in hooks.needs else None
    ctx = build_context(cfg, trained, model.visual, sae, live_teacher=teacher == "live")
    f_0 = None
    if teacher == "cache":  # the rows a teacher-cache lookup returns: precomputed, no encoder pass
        with torch.no_grad():
            f_0 = model.visual.eval()(images).clone()
    finetune.set_phase(cfg, trained, model.visual, epoch=0)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, 5, warmup + steps)

    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = method_loss(ctx, images, labels, f_0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_cuda
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"step_s": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU a second OpenMP thread that waits for a busy core makes small matmuls 100x slower)")
    parser.add_argument("--only", nargs="*", default=None, help="rows to run (default: all)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "TEACHER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.steps, args.warmup, args.device, args.threads)))
        return

    rows = args.only or list(VARIANTS)
    if "ft" not in rows:
        rows = ["ft", *rows]
    results = {}
    for row in rows:
        method, teacher = VARIANTS[row]
        cmd = [sys.executable, __file__, "--child", method, teacher, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[row] = json.loads(out.strip().splitlines()[-1])
        print(f"measured {row}: {results[row]['step_s'] * 1e3:.1f} ms/step, peak {results[row]['peak_bytes'] / 2**20:.1f} MiB", file=sys.stderr)

    # Ratios are to the mean of the ft measurements taken (first and, by default, last).
    fts = [results[r] for r in ("ft", "ft (repeat)") if r in results]
    ft = {k: statistics.mean(r[k] for r in fts) for k in ("step_s", "peak_bytes")}
    print(f"model {ARCH}, batch {args.batch}, device {args.device}, median of {args.steps} steps after {args.warmup} warm-up\n")
    print(f"threads {args.threads}; ratios to the mean of {len(fts)} ft measurement(s)\n")
    print("| method | step (ms) | time / ft | peak memory (MiB) | memory / ft |")
    print("|---|---:|---:|---:|---:|")
    for row, r in results.items():
        print(f"| {row} | {r['step_s'] * 1e3:.1f} | {r['step_s'] / ft['step_s']:.2f}x | {r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / ft['peak_bytes']:.2f}x |")
    print()
    for row, (_, limit) in TARGETS.items():
        if row in results:
            ratio = results[row]["step_s"] / ft["step_s"]
            print(f"target {row} step time <= {limit:.2f}x ft: {ratio:.2f}x {'met' if ratio <= limit else 'NOT met'}")
    row, limit = MEMORY_TARGET
    if row in results:
        ratio = results[row]["peak_bytes"] / ft["peak_bytes"]
        print(f"target {row} peak memory <= {limit:.2f}x ft: {ratio:.2f}x {'met' if ratio <= limit else 'NOT met'}")


if __name__ == "__main__":
    main()
