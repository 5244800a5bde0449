"""Benchmark: saeft's Top-K SAE training against EleutherAI's sparsify and a dense reference.

Every implementation trains from its own library's initialisation on the *same* batches, in one
process, one step each in turn (the order rotates every step), so load from other processes
hits all alike; each step is timed on its own. Printed per size and architecture: samples/s
(median step), held-out FVU after the same number of steps (one dense computation from each
model's weights; mean ± sd over ``--seeds`` initialisations), the dead fraction (latents that
fire on no held-out row), the peak memory of one step (on CPU the profiler's allocations during
the step, above what existed before it; on GPU torch's peak allocated), and saeft's ratios.
saeft's FVU counts as equal to a peer's when it is higher by less than twice the standard error
of the difference of the means. The verdicts pair like initialisations (saeft with sparsify from
saeft's init; saeft at sparsify's init scale with sparsify), so that they judge the training
code; saeft's default against sparsify's own init is printed for information.

Implementations (Adam, the same learning rate, no AuxK, no schedule, unit-norm decoder with the
parallel gradient removed):

- ``saeft``: :class:`saeft.sae.Trainer` (sparse encoder and decoder backward);
- ``sparsify``: EleutherAI's ``SparseCoder`` (``pip install saeft[bench]``) stepped as its own
  trainer steps it (``fvu`` loss, decoder renormalised before the step); its Triton decoder is
  GPU-only, so on CPU it takes its ``embedding_bag`` path. Its architecture is always its own:
  ReLU and a trained encoder bias;
- ``sparsify, saeft's init`` (``sparsify-saeft-init``): the same, started from saeft's initial
  weights (encoder, decoder, ``b_pre``), so that FVU compares the training code alone: saeft's
  encoder rows start at the decoder's norm (1), sparsify's at ``nn.Linear``'s (1/sqrt(3)), which
  learns faster in the first steps on this data (see ``saeft.sae.model.ENCODER_INIT_NORM``);
- ``saeft, init 1/sqrt(3)`` (``saeft-sparsify-init``): saeft with its encoder rows started at
  sparsify's norm (``sae.encoder_init_norm``), the like-for-like partner of ``sparsify``;
- ``dense``: the public reference recipe, autograd through a dense code and a dense decode,
  from saeft's initial weights and with saeft's loss (the two must agree in FVU);
- ``overcomplete`` (on request, ``--peers``): its ``TopKSAE`` with its default encoder (Linear
  + BatchNorm), MSE loss; its FVU (by its own forward) is that of another architecture: a speed
  reference.

Architectures (``--archs``): ``saeft`` (the default: signed top-k, no encoder bias, as the
reference code) and ``sparsify`` (ReLU on the kept values and a trained encoder bias), for saeft
and the dense reference.

    PYTHONPATH=. python bench/sae_train.py --threads 2                   # both sizes, both archs
    PYTHONPATH=. python bench/sae_train.py --sizes small --archs saeft --steps 20  # one quick table
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from saeft.sae import SAETrainConfig, TopKSAE, Trainer
from saeft.sae.model import ENCODER_INIT_NORM
from saeft.sae.train import reconstruction_loss

SIZES = {
    # name: (d, n_features, k, batch, steps, initialisations)
    "large": (512, 16384, 32, 4096, 14, 1),
    "small": (128, 4096, 16, 1024, 200, 3),
    "tiny": (32, 256, 8, 256, 6, 1),  # bench/gpu.sh --tiny: the code path in seconds, not a measurement
}
DEFAULT_SIZES = ["large", "small"]
ARCHS = {"saeft": {"relu": False, "encoder_bias": False}, "sparsify": {"relu": True, "encoder_bias": True}}
HELDOUT_ROWS = 8192
SPARSIFY_INIT_NORM = 3**-0.5
"""Norm of sparsify's initial encoder rows: ``nn.Linear``'s uniform(+-1/sqrt(d)) entries."""
SAEFT_AT_SPARSIFY_INIT = "saeft, init 1/sqrt(3)"


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


# --- the implementations: step(batch) and weights() -> (W_enc, b_enc, b_pre, W_dec.T, relu) -----

class Saeft:
    """saeft's own trainer."""

    def __init__(self, d, n_features, k, lr, arch, seed, device, train_mean, encoder_init_norm=ENCODER_INIT_NORM):
        cfg = SAETrainConfig(
            expansion=n_features // d, k=k, normalize="none", lr=lr, warmup_steps=0,
            lr_decay="none", auxk_alpha=0.0, seed=seed, encoder_init_norm=encoder_init_norm, **ARCHS[arch],
        )
        self.trainer = Trainer("saeft", cfg, d, total_steps=10**6, n_train=10**9, device=device)
        with torch.no_grad():
            self.trainer.sae.b_pre.copy_(train_mean)  # b_pre_init "mean", as train_sae does
        self.trainer.sae.train()
        self.relu = cfg.relu

    def step(self, batch):
        self.trainer.step(batch)

    def weights(self):
        sae = self.trainer.sae
        return sae.W_enc, sae.b_enc, sae.b_pre, sae.W_dec.T, self.relu


class Dense:
    """The dense reference recipe from saeft's initial weights and with saeft's loss."""

    def __init__(self, saeft: Saeft, lr):
        self.sae: TopKSAE = copy.deepcopy(saeft.trainer.sae)
        self.sae.b_enc.requires_grad_(saeft.trainer.sae.b_enc.requires_grad)
        params = [p for p in self.sae.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr)

    def step(self, batch):
        sae = self.sae
        pre = (batch - sae.b_pre) @ sae.W_enc.T + sae.b_enc
        values, indices = pre.topk(sae.k, dim=-1)
        if sae.relu:
            values = torch.relu(values)
        code = torch.zeros_like(pre).scatter(-1, indices, values)
        loss = reconstruction_loss(code @ sae.W_dec.T + sae.b_pre, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        sae.normalize_decoder_()

    def weights(self):
        sae = self.sae
        return sae.W_enc, sae.b_enc, sae.b_pre, sae.W_dec.T, sae.relu


class Sparsify:
    """EleutherAI's SparseCoder, stepped as sparsify's trainer steps it (``loss_fn="fvu"``)."""

    def __init__(self, module, d, n_features, k, lr, device, start: TopKSAE | None = None):
        SparseCoder, SparseCoderConfig = module
        cfg = SparseCoderConfig(num_latents=n_features, k=k)
        self.sae = SparseCoder(d, cfg, device=device, dtype=torch.float32)
        self.first = start is None
        if start is not None:  # saeft's initial weights (and b_pre from the data mean)
            with torch.no_grad():
                self.sae.encoder.weight.copy_(start.W_enc)
                self.sae.encoder.bias.copy_(start.b_enc)
                self.sae.W_dec.copy_(start.W_dec.T)
                self.sae.b_dec.copy_(start.b_pre)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=lr)

    def step(self, batch):
        sae = self.sae
        if self.first:  # the trainer's first step: b_dec from the batch mean
            sae.b_dec.data = batch.mean(0)
            self.first = False
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def weights(self):
        sae = self.sae
        return sae.encoder.weight, sae.encoder.bias, sae.b_dec, sae.W_dec, True


class Overcomplete:
    """overcomplete's TopKSAE with its default encoder (Linear + BatchNorm), MSE, Adam."""

    def __init__(self, module, d, n_features, k, lr, device):
        self.sae = module(d, n_features, top_k=k, device=device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=lr)

    def step(self, batch):
        _, _, recon = self.sae(batch)
        loss = (recon - batch).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def weights(self):
        return None  # not the shared architecture: measured by its own forward

    @torch.no_grad()
    def heldout(self, k: int, data: torch.Tensor) -> tuple[float, float]:
        """(FVU, dead fraction) by its own forward in eval mode (BatchNorm's running stats)."""
        self.sae.eval()
        sse, fired = 0.0, None
        for rows in data.split(2048):
            _, codes, recon = self.sae(rows)
            sse += (recon - rows).double().pow(2).sum().item()
            hit = (codes != 0).any(dim=0)
            fired = hit if fired is None else fired | hit
        self.sae.train()
        sst = (data.double() - data.double().mean(0)).pow(2).sum().item()
        return sse / sst, 1.0 - fired.float().mean().item()


def _stub_modules(names: dict[str, dict]) -> None:
    """Empty stand-ins for modules a peer imports at module level but its coder never uses."""
    for name, attrs in names.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)


def _bare_package(name: str) -> None:
    """Make ``name``'s submodules importable without running its ``__init__`` (which imports a
    trainer or plotting stack the coder does not need)."""
    spec = importlib.util.find_spec(name)
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = package


def import_sparsify(device: torch.device):
    """(SparseCoder, SparseCoderConfig, version), or None when sparsify is not installed."""
    if importlib.util.find_spec("sparsify") is None:
        return None
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder is GPU-only
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:  # its HF trainer's stack (transformers, datasets...) is not installed
        _bare_package("sparsify")
        accelerate = {"accelerate": {}, "accelerate.utils": {"send_to_device": None}}
        _stub_modules({**accelerate, "transformers": {"PreTrainedModel": object}})
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    return (SparseCoder, SparseCoderConfig), importlib.metadata.version("eai-sparsify")


def import_overcomplete():
    """(TopKSAE, version), or None when overcomplete is not installed."""
    if importlib.util.find_spec("overcomplete") is None:
        return None
    try:
        from overcomplete.sae import TopKSAE as OvercompleteSAE
    except (ImportError, AttributeError):  # its plotting module breaks on newer matplotlib
        _bare_package("overcomplete")
        from overcomplete.sae import TopKSAE as OvercompleteSAE
    return OvercompleteSAE, importlib.metadata.version("overcomplete")


# --- measuring ------------------------------------------------------------------------------

@torch.no_grad()
def heldout_metrics(weights, k: int, data: torch.Tensor) -> tuple[float, float]:
    """(FVU, dead fraction) on held-out rows by one dense computation for every implementation:
    top-k of ``W_enc (x - b_pre) + b_enc`` (ReLU'd if the architecture has it), decoded densely.
    Dead: latents that fire (non-zero) on no held-out row."""
    W_enc, b_enc, b_pre, W_cols, relu = (w.detach().float() if torch.is_tensor(w) else w for w in weights)
    sse, fired = 0.0, torch.zeros(W_enc.shape[0], dtype=torch.bool, device=data.device)
    for rows in data.split(2048):
        values, indices = ((rows - b_pre) @ W_enc.T + b_enc).topk(k, dim=-1)
        if relu:
            values = torch.relu(values)
        code = torch.zeros(rows.shape[0], W_enc.shape[0], device=data.device).scatter(-1, indices, values)
        sse += ((code @ W_cols + b_pre) - rows).double().pow(2).sum().item()
        fired[indices[values != 0]] = True
    sst = (data.double() - data.double().mean(0)).pow(2).sum().item()
    return sse / sst, 1.0 - fired.float().mean().item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_step_bytes(impl, batch: torch.Tensor, device: torch.device) -> int:
    """Peak memory one step allocates above what existed before it: on GPU torch's peak
    allocated; on CPU the running sum of the profiler's allocation events."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        impl.step(batch)
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        impl.step(batch)
    events = sorted(
        (ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events() if ev.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def train_side_by_side(impls: dict, batches, warmup: int, device) -> dict[str, list[float]]:
    """Every implementation steps on every batch, the order rotating each step; returns the
    step times after ``warmup``."""
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step, batch in enumerate(batches):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            impls[name].step(batch)
            _sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def build(peer_modules, size, arch, args, seed, device, batches):
    """The implementations for one size and architecture, each from its library's init."""
    d, n_features, k = size[:3]
    train_mean = torch.cat(batches).mean(dim=0)
    torch.manual_seed(seed)  # the peers initialise from torch's global generator
    impls = {"saeft": Saeft(d, n_features, k, args.lr, arch, seed, device, train_mean)}
    if "saeft-sparsify-init" in args.peers:
        impls[SAEFT_AT_SPARSIFY_INIT] = Saeft(d, n_features, k, args.lr, arch, seed, device, train_mean, SPARSIFY_INIT_NORM)
    if "dense" in args.peers:
        impls["dense"] = Dense(impls["saeft"], args.lr)
    if peer_modules.get("sparsify"):
        impls["sparsify"] = Sparsify(peer_modules["sparsify"][0], d, n_features, k, args.lr, device)
        if "sparsify-saeft-init" in args.peers:
            start = impls["saeft"].trainer.sae
            impls["sparsify, saeft's init"] = Sparsify(peer_modules["sparsify"][0], d, n_features, k, args.lr, device, start)
    if peer_modules.get("overcomplete"):
        impls["overcomplete"] = Overcomplete(peer_modules["overcomplete"][0], d, n_features, k, args.lr, device)
    return impls


def run_one(name, size, arch, peer_modules, args, device) -> dict:
    """Train every implementation side by side at one size and architecture, from ``--seeds``
    initialisations on the same data; its table rows."""
    d, n_features, k, batch, steps, seeds = size
    steps, seeds = args.steps or steps, args.seeds or seeds
    # One stream of batches from the same atoms: the first train, the rest are held out.
    stream = synthetic_batches(d, 4 * n_features, 8, batch, steps + -(-HELDOUT_ROWS // batch), args.seed)
    data = [b.to(device) for b in stream[:steps]]
    heldout = torch.cat(stream[steps:])[:HELDOUT_ROWS].to(device)
    warmup = min(args.warmup, steps - 1)
    times: dict[str, list[float]] = {}
    metrics: dict[str, list[tuple[float, float]]] = {}
    peaks: dict[str, float] = {}
    for seed in range(args.seed, args.seed + seeds):
        impls = build(peer_modules, size, arch, args, seed, device, data)
        for impl_name, impl_times in train_side_by_side(impls, data, warmup, device).items():
            times.setdefault(impl_name, []).extend(impl_times)
        for impl_name, impl in impls.items():
            weights = impl.weights()
            measured = heldout_metrics(weights, k, heldout) if weights is not None else impl.heldout(k, heldout)
            metrics.setdefault(impl_name, []).append(measured)
        for impl_name, impl in impls.items():  # after the FVUs: this extra step changes the weights
            peaks.setdefault(impl_name, peak_step_bytes(impl, data[0], device) / 2**20)
        del impls
    rows = {}
    for impl_name, values in metrics.items():
        fvus = [fvu for fvu, _ in values]
        rows[impl_name] = {
            "samples_s": batch / statistics.median(times[impl_name]), "fvu": statistics.mean(fvus),
            "fvu_sd": statistics.stdev(fvus) if len(fvus) > 1 and all(map(math.isfinite, fvus)) else None,
            "dead": statistics.mean(dead for _, dead in values), "peak_mib": peaks[impl_name],
            "n": len(fvus),
        }
    print_table(name, size, arch, steps, warmup, rows, seeds)
    return rows


def fvu_verdict(ours: dict, peer: dict) -> str:
    """``better`` (lower mean FVU), ``equal`` (higher by less than twice the standard error of
    the difference of the means over the initialisations) or ``WORSE``."""
    if ours["fvu"] <= peer["fvu"]:
        return "better"
    if ours["fvu_sd"] is not None and peer["fvu_sd"] is not None:
        se = (ours["fvu_sd"] ** 2 / ours["n"] + peer["fvu_sd"] ** 2 / peer["n"]) ** 0.5
        if ours["fvu"] - peer["fvu"] < 2 * se:
            return "equal within the spread of initialisations"
    return "WORSE"


def print_table(name, size, arch, steps, warmup, rows, seeds) -> None:
    d, n_features, k, batch = size[:4]
    over = f" (mean ± sd over {seeds} initialisations)" if seeds > 1 else ""
    print(f"\n### {name}: d {d}, {n_features} latents, k {k}, batch {batch}; architecture {arch} "
          f"({'ReLU + encoder bias' if ARCHS[arch]['relu'] else 'signed top-k, no encoder bias'}); "
          f"FVU after {steps} steps{over}, samples/s: median of {seeds * (steps - warmup)} steps\n")
    print("| implementation | samples/s | held-out FVU | dead fraction | peak step memory (MiB) | saeft speed / this |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl_name, r in rows.items():
        ratio = rows["saeft"]["samples_s"] / r["samples_s"]
        fvu = f"{r['fvu']:.4f}" + (f" ± {r['fvu_sd']:.4f}" if r["fvu_sd"] is not None else "")
        print(f"| {impl_name} | {r['samples_s']:.0f} | {fvu} | {r['dead']:.4f} | "
              f"{r['peak_mib']:.0f} | {ratio:.2f}x |")
    s = rows["saeft"]
    print()
    # Each pair says what differs besides the code: only a pair with the same init and architecture
    # judges the training code alone (sparsify's coder always has a ReLU and an encoder bias).
    same_arch = ARCHS[arch]["relu"] and ARCHS[arch]["encoder_bias"]
    for ours_name, peer, init in (("saeft", "sparsify, saeft's init", "same initial weights"),
                                  (SAEFT_AT_SPARSIFY_INIT, "sparsify", "same init scale"),
                                  ("saeft", "sparsify", "init scales differ")):
        if peer in rows and ours_name in rows:
            ours, p = rows[ours_name], rows[peer]
            speed, verdict = ours["samples_s"] / p["samples_s"], fvu_verdict(ours, p)
            met = speed >= 1.0 and verdict != "WORSE"
            like = f"{init}, {'same architecture' if same_arch else 'architectures differ'}"
            print(f"{ours_name} / {peer} ({like}): speed {speed:.2f}x, FVU {ours['fvu']:.4f} vs {p['fvu']:.4f} "
                  f"({verdict}); speed >= 1.0 at equal or better FVU: {'met' if met else 'NOT met'}")
    if "dense" in rows:
        rel = abs(s["fvu"] - rows["dense"]["fvu"]) / rows["dense"]["fvu"]
        print(f"saeft / dense: speed {s['samples_s'] / rows['dense']['samples_s']:.2f}x, "
              f"FVU relative difference {100 * rel:.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=DEFAULT_SIZES)
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--peers", nargs="*", default=["dense", "sparsify", "sparsify-saeft-init", "saeft-sparsify-init"],
                        choices=["dense", "sparsify", "sparsify-saeft-init", "saeft-sparsify-init", "overcomplete"],
                        help="sparsify-saeft-init: sparsify's coder and step from saeft's initial weights; "
                             "saeft-sparsify-init: saeft with encoder rows at sparsify's initial norm")
    parser.add_argument("--steps", type=int, default=None, help="steps per initialisation (default: 14 large, 200 small)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the first initialisation")
    parser.add_argument("--seeds", type=int, default=None,
                        help="initialisations trained per table, FVU as mean ± sd (default: 1 large, 3 small)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peer_modules = {}
    if "sparsify" in args.peers or "sparsify-saeft-init" in args.peers:
        peer_modules["sparsify"] = import_sparsify(device)
    if "overcomplete" in args.peers:
        peer_modules["overcomplete"] = import_overcomplete()
    versions = [f"torch {torch.__version__}"]
    for peer, found in peer_modules.items():
        if found is None:
            print(f"{peer} is not installed (pip install saeft[bench]): its rows are skipped")
        else:
            versions.append(f"{peer} {found[1]}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"threads={torch.get_num_threads()} device={device} load average at start "
          f"{os.getloadavg()[0]:.2f}; {', '.join(versions)}; float32, Adam lr {args.lr}")
    for name in args.sizes:
        for arch in args.archs:
            run_one(name, SIZES[name], arch, peer_modules, args, device)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
