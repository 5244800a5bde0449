# Zero-shot image embeddings per model, dataset and split, in HDF5; and of every view of the
# training bank when fine-tuning augments (the teacher cache of the feature and SAE methods).


rule cache_activations:
    input:
        model=f"{R}/models/{{model}}/zeroshot/model.safetensors",
        check=lambda wildcards: check_marker(wildcards.dataset, wildcards.split),
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


rule cache_views:
    input:
        model=f"{R}/models/{{model}}/zeroshot/model.safetensors",
        check=lambda wildcards: check_marker(wildcards.dataset, wildcards.split),
    output:
        f"{R}/cache/{{model}}/{{dataset}}/{{split}}.views.h5",
    params:
        options=lambda wildcards: as_json(dataset_options(wildcards.dataset)),
        cfg=as_json(config["cache"]),
        views=as_json(view_config()),
        source=pretrained_source() or "",
        track=track("cache_views"),
    log:
        f"logs/{STUDY}/cache_views/{{model}}/{{dataset}}/{{split}}.log",
    benchmark:
        f"benchmarks/{STUDY}/cache_views/{{model}}/{{dataset}}/{{split}}.tsv"
    shell:
        "saeft cache --model {input.model} --pretrained {params.source:q} --dataset {wildcards.dataset}"
        " --dataset-options {params.options:q} --split {wildcards.split} --config {params.cfg:q}"
        " --views {params.views:q} --out {output} --threads {threads} --track {params.track:q} > {log} 2>&1"
