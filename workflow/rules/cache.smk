# Zero-shot image embeddings per model, dataset and split, in HDF5.


rule cache_activations:
    input:
        model=f"{R}/models/{{model}}/zeroshot/model.safetensors",
    output:
        f"{R}/cache/{{model}}/{{dataset}}/{{split}}.h5",
    params:
        options=lambda wildcards: as_json(dataset_options(wildcards.dataset)),
        cfg=as_json(config["cache"]),
        source=pretrained_source() or "",
        track=track("cache_activations"),
    log:
        f"logs/{STUDY}/cache_activations/{{model}}/{{dataset}}/{{split}}.log",
    benchmark:
        f"benchmarks/{STUDY}/cache_activations/{{model}}/{{dataset}}/{{split}}.tsv"
    resources:
        gpu=1,
    shell:
        "saeft cache --model {input.model} --pretrained {params.source:q} --dataset {wildcards.dataset}"
        " --dataset-options {params.options:q} --split {wildcards.split} --config {params.cfg:q}"
        " --out {output} --threads {threads} --track {params.track:q} > {log} 2>&1"
