# Sparse autoencoders per dataset, trained on the zero-shot embeddings of its training split;
# metrics on the held-out split (with the dataset's zero-shot head: how much task information
# the reconstructions keep). `sae:` is the SAE the SAE methods use; `sae.sweep:` lists extra
# SAEs (overrides of `sae:`), trained together in one job, one folder each.


def sae_inputs(wildcards):
    spec = get_dataset(wildcards.dataset)
    base = f"{R}/cache/{wildcards.model}/{wildcards.dataset}"
    return {
        "train": f"{base}/{spec.train_split}.h5",
        "heldout": f"{base}/{spec.heldout_split}.h5",
        "head": f"{R}/models/{wildcards.model}/zeroshot/heads/{wildcards.dataset}.safetensors",
    }


rule train_sae:
    input:
        unpack(sae_inputs),
    output:
        weights=f"{R}/sae/{{model}}/{{dataset}}/sae.safetensors",
        metrics=f"{R}/sae/{{model}}/{{dataset}}/sae.json",
    params:
        cfg=as_json(sae_config()),
        track=track("train_sae"),
    log:
        f"logs/{STUDY}/train_sae/{{model}}/{{dataset}}.log",
    benchmark:
        f"benchmarks/{STUDY}/train_sae/{{model}}/{{dataset}}.tsv"
    resources:
        gpu=1,
    shell:
        "saeft train-sae --train {input.train} --heldout {input.heldout} --head {input.head}"
        " --config {params.cfg:q} --out-weights {output.weights} --out-json {output.metrics}"
        " --threads {threads} --track {params.track:q} > {log} 2>&1"


if SAE_SWEEP:

    rule train_sae_sweep:
        input:
            unpack(sae_inputs),
        output:
            [f"{R}/sae/{{model}}/{{dataset}}/{name}/{leaf}" for name in SAE_SWEEP for leaf in ("sae.safetensors", "sae.json")],
        params:
            cfg=as_json(config["sae"]),
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
            " --config {params.cfg:q} --out-dir {params.out_dir}"
            " --threads {threads} --track {params.track:q} > {log} 2>&1"
