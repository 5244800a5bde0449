# Sparse autoencoders per dataset, trained on the zero-shot embeddings of its SAE training split
# (many ID images; `sae.data: pretrain`: the pretraining corpus); metrics on the held-out split
# and on every evaluation split (with the dataset's zero-shot head: how much task information
# the reconstructions keep). `sae:` is the SAE the SAE methods use; `sae.sweep:` lists extra
# SAEs (overrides of `sae:`), trained together in one job, one folder each.


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


def sae_eval_args(wildcards, input):
    return " ".join(f"{os.path.basename(path)[:-3]}={path}" for path in input.evals)


rule train_sae:
    input:
        unpack(sae_inputs),
    output:
        weights=f"{R}/sae/{{model}}/{{dataset}}/sae.safetensors",
        metrics=f"{R}/sae/{{model}}/{{dataset}}/sae.json",
    params:
        cfg=as_json(sae_config()),
        evals=sae_eval_args,
        track=track("train_sae"),
    log:
        f"logs/{STUDY}/train_sae/{{model}}/{{dataset}}.log",
    benchmark:
        f"benchmarks/{STUDY}/train_sae/{{model}}/{{dataset}}.tsv"
    resources:
        gpu=1,
    shell:
        "saeft train-sae --train {input.train} --heldout {input.heldout} --head {input.head}"
        " --config {params.cfg:q} --out-weights {output.weights} --out-json {output.metrics} --eval {params.evals}"
        " --threads {threads} --track {params.track:q} > {log} 2>&1"


if SAE_SWEEP:

    rule train_sae_sweep:
        input:
            unpack(sae_inputs),
        output:
            [f"{R}/sae/{{model}}/{{dataset}}/{name}/{leaf}" for name in SAE_SWEEP for leaf in ("sae.safetensors", "sae.json")],
        params:
            cfg=as_json(config["sae"]),
            evals=sae_eval_args,
            out_dir=lambda wildcards: f"{R}/sae/{wildcards.model}/{wildcards.dataset}",
            track=track("train_sae_sweep"),
        log:
            f"logs/{STUDY}/train_sae_sweep/{{model}}/{{dataset}}.log",
        benchmark:
            f"benchmarks/{STUDY}/train_sae_sweep/{{model}}/{{dataset}}.tsv"
        resources:
            gpu=1,
        shell:
            "saeft train-sae-sweep --train {input.train} --heldout {input.heldout} --head {input.head}"
            " --config {params.cfg:q} --out-dir {params.out_dir} --eval {params.evals}"
            " --threads {threads} --track {params.track:q} > {log} 2>&1"
