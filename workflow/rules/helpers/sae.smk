# The input, file and settings functions of the rules in ../sae.smk (Snakemake's linter wants
# rules and functions in separate files).


def sae_inputs(wildcards):
    spec = get_dataset(wildcards.dataset)
    base = f"{R}/cache/{wildcards.model}/{wildcards.dataset}"
    train, heldout = spec.sae_splits(config["sae"]["data"])
    return {
        "train": f"{base}/{train}.h5",
        "heldout": f"{base}/{heldout}.h5",
        "head": f"{R}/models/{wildcards.model}/zeroshot/heads/{wildcards.dataset}.safetensors",
        "evals": [f"{base}/{split}.h5" for split in spec.eval_splits],
    }


def sweep_data():
    """The `data` values the sweep's entries train on, sorted (an entry without one: `sae.data`)."""
    return sorted({entry.get("data", config["sae"]["data"]) for entry in config["sae"]["sweep"]})


def sae_sweep_inputs(wildcards):
    """sae_inputs, with a training cache per `data` value the sweep's entries train on."""
    spec = get_dataset(wildcards.dataset)
    base = f"{R}/cache/{wildcards.model}/{wildcards.dataset}"
    return {**sae_inputs(wildcards), "train": [f"{base}/{spec.sae_splits(kind)[0]}.h5" for kind in sweep_data()]}


def sae_files(wildcards, input, output):
    """The SAE's data (training and held-out caches, the zero-shot head, each eval split's cache)
    and what it writes."""
    evals = [f"{os.path.basename(path)[:-3]}={path}" for path in input.evals]
    written = {"--out-weights": output.weights, "--out-json": output.metrics} if "weights" in output.keys() else {}
    return {"--train": input.train, "--heldout": input.heldout, "--head": input.head, **written, "--eval": evals}


def sae_settings(wildcards):
    return {"--config": sae_config()}


def sae_sweep_files(wildcards, input, output):
    """sae_files with each training cache named by its `data`, and the folder of the entries'
    folders (from the outputs: <out-dir>/<name>/<leaf>)."""
    return {
        **sae_files(wildcards, input, output),
        "--train": [f"{kind}={path}" for kind, path in zip(sweep_data(), input.train)],
        "--out-dir": os.path.dirname(os.path.dirname(output[0])),
    }


def sae_sweep_settings(wildcards):
    return {"--config": config["sae"]}
