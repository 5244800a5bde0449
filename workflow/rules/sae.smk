# A Top-K sparse autoencoder per dataset, trained on the zero-shot embeddings of its training
# split; metrics on the held-out split.


def sae_inputs(wildcards):
    spec = get_dataset(wildcards.dataset)
    base = f"{R}/cache/{wildcards.model}/{wildcards.dataset}"
    return {"train": f"{base}/{spec.train_split}.h5", "heldout": f"{base}/{spec.heldout_split}.h5"}


rule train_sae:
    input:
        unpack(sae_inputs),
    output:
        weights=f"{R}/sae/{{model}}/{{dataset}}/sae.safetensors",
        metrics=f"{R}/sae/{{model}}/{{dataset}}/sae.json",
    params:
        cfg=as_json(config["sae"]),
        track=track("train_sae"),
    log:
        f"logs/{STUDY}/train_sae/{{model}}/{{dataset}}.log",
    benchmark:
        f"benchmarks/{STUDY}/train_sae/{{model}}/{{dataset}}.tsv"
    shell:
        "saeft train-sae --train {input.train} --heldout {input.heldout} --config {params.cfg:q}"
        " --out-weights {output.weights} --out-json {output.metrics}"
        " --threads {threads} --track {params.track:q} > {log} 2>&1"
