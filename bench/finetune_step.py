"""Step time and peak memory of every fine-tuning method relative to ``ft``, and a paired,
repeated measurement of the targets' step-time ratios with the interval the noise allows.

Same model (the ResNet ``saeft-tiny-rn``, random weights: nothing is downloaded), same batch, same
data. Two measurements:

- the table: one process per method so that peak memory is that method's own; each child times
  ``--steps`` full training steps (forward, loss, backward, clipping, AdamW, schedule) after
  ``--warmup`` untimed ones and reports the median step. Peak memory: on GPU the peak allocated
  by torch; on CPU the peak resident set size minus the RSS before the model was built (so
  torch's own import does not dilute the ratios). ``ft`` runs first and last: their spread is
  the noise between processes;
- the targets (``saeft (cache)``, ``saeft (live)``) against ``ft``, paired: one process builds
  ``ft``, a second ``ft`` and the target models afresh every block and steps them in turn (a
  random order each round), so load from other processes hits all alike. Each block of
  ``--block`` rounds gives one ratio per model (its median step over ``ft``'s); blocks repeat
  (at least ``--min-blocks``)
  until the 95% interval of every ratio (t-interval of the blocks' log-ratios) is narrower than
  ``--precision`` (default ±2%), or ``--max-blocks`` is reached. The ``ft (repeat)`` / ``ft``
  interval is the noise check: it should contain 1.

On a CPU device a step's time is the process's CPU time (``--clock``): with one torch thread that
is the step's own work, and the time other processes hold the core does not count.

    PYTHONPATH=. python bench/finetune_step.py [--batch 32] [--steps 12] [--device cpu]
    PYTHONPATH=. python bench/finetune_step.py --only ft "saeft (cache)"   # the target alone
    PYTHONPATH=. python bench/finetune_step.py --device cuda --model ViT-B-16 --batch 128 --dtype bf16  # bench/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
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
TARGETS = {"saeft (cache)": 1.05, "saeft (live)": 1.40}
"""Step-time targets: the upper end of the paired interval of the ratio to ``ft``."""
MEMORY_TARGET = ("saeft (cache)", 1.10)
"""Peak memory target: the ratio to ft in the table."""
ARCH = "saeft-tiny-rn"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def image_size_of(arch: str) -> int:
    """The input resolution open_clip's config of ``arch`` declares."""
    from saeft.nn.models import open_clip_module

    size = open_clip_module().get_model_config(arch)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def build_step(method: str, teacher: str, batch: int, device_name: str, clock=time.perf_counter,
               arch: str = ARCH, image_size: int | None = None, precision: str = "fp32"):
    """A closure running one full training step of ``method`` (its own model, optimiser and
    loss context) and returning its duration on ``clock``, and the RSS before its model was
    built. ``arch`` (random weights) at ``image_size`` (default: the architecture's own);
    ``precision`` bf16 runs the loss under the autocast fine-tuning uses (on GPU only, as there)."""
    import torch

    from saeft.data.registry import get_dataset
    from saeft.data.synthetic import CLASSNAMES
    from saeft.methods import get_method
    from saeft.nn.loss import Towers, build_context, method_loss
    from saeft.nn.models import ImageClassifier, create_clip
    from saeft.nn.training import warmup_cosine
    from saeft.sae import TopKSAE
    from saeft.stages import finetune

    device = torch.device(device_name)
    n_classes, size = len(CLASSNAMES), image_size or image_size_of(arch)
    data = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=data).to(device)
    labels = torch.arange(batch, device=device) % n_classes
    base_rss = _rss_bytes()
    torch.manual_seed(0)
    clip = create_clip(arch).to(device)
    head = torch.randn(n_classes, clip.visual.output_dim, device=device)
    model = ImageClassifier(clip.visual, head)
    params = {"probe": "epochs", "lp_epochs": 1} if method == "lpft" else {}
    cfg = finetune.FinetuneConfig(method=method, method_params=params, teacher="live" if teacher == "live" else "auto",
                                  precision=precision)
    hooks = get_method(method)
    trained: torch.nn.Module = model
    if hooks.build_trained is not None:  # e.g. flyp's two towers, with the synthetic world's class prompts
        trained = hooks.build_trained(Towers(clip=clip, arch=arch, classifier=model, spec=get_dataset("shapes"))).to(device)
    d = clip.visual.output_dim
    sae = TopKSAE(d, 4 * d, 32, generator=torch.Generator().manual_seed(0)).to(device) if "sae" in hooks.needs else None
    ctx = build_context(cfg, trained, model.visual, sae, live_teacher=teacher == "live")
    f_0 = None
    if teacher == "cache":  # the rows a teacher-cache lookup returns: precomputed, no encoder pass
        with torch.no_grad():
            f_0 = model.visual.eval()(images).clone()
    finetune.set_phase(cfg, trained, model.visual, epoch=0)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, 5, 10**6)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        with finetune.autocast_for(cfg, device):
            loss, _ = method_loss(ctx, images, labels, f_0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    return step, base_rss


def clock_of(name: str, device_name: str):
    """``cpu``: the process's CPU time, blind to the time other processes hold the core (on a
    CPU device with one torch thread it is the step's own work); ``wall``: elapsed time;
    ``auto``: cpu on a CPU device, wall on a GPU."""
    if name == "auto":
        name = "wall" if device_name.startswith("cuda") else "cpu"
    return time.process_time if name == "cpu" else time.perf_counter


def child(method: str, teacher: str, batch: int, steps: int, warmup: int, device_name: str, threads: int,
          clock: str = "auto", arch: str = ARCH, image_size: int | None = None, precision: str = "fp32") -> dict:
    """Time one method's training step and its peak memory; runs in its own process."""
    import torch

    from saeft.nn.training import setup_torch

    setup_torch(0, threads)
    cuda = torch.device(device_name).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step, base_rss = build_step(method, teacher, batch, device_name, clock_of(clock, device_name), arch, image_size, precision)
    times = [step() for _ in range(warmup + steps)][warmup:]
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_cuda
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"step_s": statistics.median(times), "peak_bytes": peak}


def interval(log_ratios: list[float]) -> tuple[float, float, float]:
    """(ratio, low, high): the geometric mean of the blocks' ratios and its 95% t-interval."""
    n = len(log_ratios)
    mean = statistics.mean(log_ratios)
    if n < 2:
        return math.exp(mean), 0.0, math.inf
    half = _T975[min(n - 1, len(_T975)) - 1] * statistics.stdev(log_ratios) / n**0.5
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then ~1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042, 1.960]


def paired(rows: list[str], args) -> dict:
    """Step ``ft``, ``ft (repeat)`` and ``rows`` in turn in this process, in blocks, until every
    ratio's interval (the noise check's too) is narrower than ``args.precision``; returns the
    per-block log-ratios and ft's median step per block. Runs in a child process of its own."""
    from saeft.nn.training import setup_torch

    setup_torch(0, args.threads)
    names = ["ft", "ft (repeat)", *[r for r in rows if r not in ("ft", "ft (repeat)")]]
    clock = clock_of(args.clock, args.device)
    order = random.Random(0)
    blocks: dict[str, list[float]] = {name: [] for name in names[1:]}
    ft_medians: list[float] = []
    limit = math.log(1 + args.precision)
    for block in range(args.max_blocks):
        # Fresh models every block: what one instance's memory placement costs or saves
        # averages out over the blocks instead of biasing every one of them alike.
        steps = {name: build_step(*VARIANTS[name], args.batch, args.device, clock, args.model, args.image_size, args.dtype)[0]
                 for name in names}
        for name in names:
            for _ in range(args.warmup):
                steps[name]()
        times = {name: [] for name in names}
        for _ in range(args.block):
            for name in order.sample(names, len(names)):  # no model always follows the same one
                times[name].append(steps[name]())
        del steps
        ft = statistics.median(times["ft"])
        ft_medians.append(ft)
        for name in names[1:]:
            blocks[name].append(math.log(statistics.median(times[name]) / ft))
        if block + 1 >= args.min_blocks and all(_half_width(v) < limit for v in blocks.values()):
            break
    return {"blocks": blocks, "ft_medians": ft_medians}


def _half_width(log_ratios: list[float]) -> float:
    ratio, low, _ = interval(log_ratios)
    return math.log(ratio / low)


def run_child(argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def common_args(args) -> list[str]:
    return ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--device", args.device, "--threads", str(args.threads), "--block", str(args.block),
            "--min-blocks", str(args.min_blocks), "--max-blocks", str(args.max_blocks), "--precision", str(args.precision), "--clock", args.clock,
            "--model", args.model, "--dtype", args.dtype] + (["--image-size", str(args.image_size)] if args.image_size else [])


def setup_note(args) -> str:
    """The options that differ from the defaults (the model's input size, the dtype), for the headers."""
    note = f", {args.image_size} px" if args.image_size else ""
    return note + (f", {args.dtype} autocast" if args.dtype != "fp32" else "")


def print_table(results: dict, args) -> None:
    # Ratios are to the mean of the ft measurements taken (first and, by default, last).
    fts = [results[r] for r in ("ft", "ft (repeat)") if r in results]
    ft = {k: statistics.mean(r[k] for r in fts) for k in ("step_s", "peak_bytes")}
    clock = "wall" if clock_of(args.clock, args.device) is time.perf_counter else "CPU"
    print(f"model {args.model}{setup_note(args)}, batch {args.batch}, device {args.device}, threads {args.threads}, {clock} time, "
          f"median of {args.steps} steps after {args.warmup} warm-up, one process per method; "
          f"ratios to the mean of {len(fts)} ft measurement(s)\n")
    print("| method | step (ms) | time / ft | peak memory (MiB) | memory / ft |")
    print("|---|---:|---:|---:|---:|")
    for row, r in results.items():
        print(f"| {row} | {r['step_s'] * 1e3:.1f} | {r['step_s'] / ft['step_s']:.2f}x | "
              f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / ft['peak_bytes']:.2f}x |")
    if len(fts) == 2:
        spread = abs(fts[1]["step_s"] / fts[0]["step_s"] - 1)
        print(f"\nnoise between processes: ft and ft (repeat) differ by {100 * spread:.1f}%")
    row, limit = MEMORY_TARGET
    if row in results:
        ratio = results[row]["peak_bytes"] / ft["peak_bytes"]
        print(f"target {row} peak memory <= {limit:.2f}x ft: {ratio:.2f}x {'met' if ratio <= limit else 'NOT met'}")


def print_paired(measured: dict, args) -> None:
    blocks, fts = measured["blocks"], measured["ft_medians"]
    spread = statistics.stdev(fts) / statistics.mean(fts) if len(fts) > 1 else 0.0
    clock = "wall" if clock_of(args.clock, args.device) is time.perf_counter else "CPU"
    print(f"\npaired, in one process, {clock} time{setup_note(args)}: {len(fts)} blocks of {args.block} rounds (models built afresh "
          f"each block, one step each per round in a random order); ft's median step per block {min(fts) * 1e3:.1f}-{max(fts) * 1e3:.1f} ms "
          f"(coefficient of variation {100 * spread:.1f}%: the load the measurement ran under)\n")
    print("| ratio to ft | geometric mean | 95% interval | target | |")
    print("|---|---:|---:|---:|---|")
    for name, logs in blocks.items():
        ratio, low, high = interval(logs)
        limit = TARGETS.get(name)
        verdict = "noise check: contains 1" if limit is None else ("met" if high <= limit else "NOT met")
        if limit is None and not low <= 1 <= high:
            verdict = "noise check: does NOT contain 1"
        target = f"<= {limit:.2f}" if limit else ""
        print(f"| {name} / ft | {ratio:.3f}x | {low:.3f}-{high:.3f}x (±{100 * (high / ratio - 1):.1f}%) | {target} | {verdict} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU a second OpenMP thread that waits for a busy core makes small matmuls 100x slower)")
    parser.add_argument("--only", nargs="*", default=None, help="rows of the table to run (default: all)")
    parser.add_argument("--block", type=int, default=10, help="rounds per block of the paired measurement")
    parser.add_argument("--min-blocks", type=int, default=5)
    parser.add_argument("--max-blocks", type=int, default=60)
    parser.add_argument("--precision", type=float, default=0.02,
                        help="stop when every ratio's 95%% interval is narrower than ± this (default ±2%%: the ±3%% the targets need, with room)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="what a step's time is: the process's CPU time (auto on CPU: blind to other processes holding the core) or wall-clock time (auto on GPU)")
    parser.add_argument("--model", default=ARCH, help=f"open_clip architecture, random weights (default {ARCH})")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the architecture's own)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the loss under fine-tuning's bf16 autocast (GPU only; CPU runs fp32 as fine-tuning does)")
    parser.add_argument("--no-table", action="store_true", help="only the paired measurement of the targets")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "TEACHER"), help=argparse.SUPPRESS)
    parser.add_argument("--paired", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.steps, args.warmup, args.device, args.threads, args.clock,
                              args.model, args.image_size, args.dtype)))
        return
    if args.paired is not None:
        print(json.dumps(paired(args.paired, args)))
        return

    rows = args.only or list(VARIANTS)
    if not args.no_table:
        if "ft" not in rows:
            rows = ["ft", *rows]
        results = {}
        for row in rows:
            results[row] = run_child(["--child", *VARIANTS[row], *common_args(args)])
            print(f"measured {row}: {results[row]['step_s'] * 1e3:.1f} ms/step, peak {results[row]['peak_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
        print_table(results, args)
    targets = [row for row in rows if row in TARGETS]
    if targets:
        print_paired(run_child(["--paired", *targets, *common_args(args)]), args)


if __name__ == "__main__":
    main()
