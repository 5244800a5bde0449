# Zero-shot image embeddings per model, dataset and split, in HDF5; and of every view of the
# training bank when fine-tuning augments (the teacher cache of the feature and SAE methods).


def cache_inputs(wildcards):
    """The zero-shot model, and the split's check marker when it is read from data_root."""
    return {"model": f"{R}/models/{wildcards.model}/zeroshot/model.safetensors",
            "check": check_marker(wildcards.dataset, wildcards.split)}


def cache_files(wildcards, input, output):
    return {"--model": input.model, "--out": output[0]}


def cache_settings(wildcards):
    return {"--pretrained": pretrained_source() or "", "--dataset": wildcards.dataset,
            "--dataset-options": dataset_options(wildcards.dataset), "--split": wildcards.split, "--config": config["cache"]}


def cache_views_settings(wildcards):
    return {**cache_settings(wildcards), "--views": view_config()}


rule cache_activations:
    input:
        unpack(cache_inputs),
    output:
        f"{R}/cache/{{model}}/{{dataset}}/{{split}}.h5",
    params:
        files=job_files(cache_files),
        settings=job_settings("cache_activations", cache_settings),
    threads: 1
    log: job_log("cache_activations", "{model}/{dataset}/{split}"),
    benchmark: job_benchmark("cache_activations", "{model}/{dataset}/{split}"),
    conda: "../envs/saeft.yaml"
    resources: gpu=1
    shell:
        "saeft cache {params.files} {params.settings} --threads {threads} > {log} 2>&1"


rule cache_views:
    input:
        unpack(cache_inputs),
    output:
        f"{R}/cache/{{model}}/{{dataset}}/{{split}}.views.h5",
    params:
        files=job_files(cache_files),
        settings=job_settings("cache_views", cache_views_settings),
    threads: 1
    log: job_log("cache_views", "{model}/{dataset}/{split}"),
    benchmark: job_benchmark("cache_views", "{model}/{dataset}/{split}"),
    conda: "../envs/saeft.yaml"
    shell:
        "saeft cache {params.files} {params.settings} --threads {threads} > {log} 2>&1"
