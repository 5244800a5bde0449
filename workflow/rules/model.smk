# The zero-shot model: pretrained by the pipeline itself on the captioned corpus of dataset
# pretrain.dataset (offline studies; the shapes world by default) or taken from open_clip weights,
# then materialised as one local safetensors file with a zero-shot head per dataset.


def pretrain_files(wildcards, input, output):
    return {"--out": output.weights, "--quality": output.quality}


def pretrain_settings(wildcards):
    return {"--arch": wildcards.model, "--dataset-options": dataset_options(pretrain_dataset()), "--config": pretrain_config()}


rule pretrain_clip:
    output:
        weights=f"{R}/pretrain/{{model}}/model.safetensors",
        quality=f"{R}/pretrain/{{model}}/quality.json",
    params:
        files=job_files(pretrain_files),
        settings=job_settings("pretrain_clip", pretrain_settings),
    log: job_log("pretrain_clip", "{model}"),
    benchmark: job_benchmark("pretrain_clip", "{model}"),
    conda: "../envs/saeft.yaml"
    threads: all_cores
    resources: gpu=1
    shell:
        "saeft pretrain {params.files} {params.settings} --threads {threads} > {log} 2>&1"


def prepare_model_input(wildcards):
    """The pretrain_clip output when the study pretrains its own model, else a local file (or none)."""
    source = pretrained_source()
    kind = pretrained_kind(source)
    if kind == "pipeline":
        folder = f"{R}/pretrain/{wildcards.model}"
        return {"weights": f"{folder}/model.safetensors", "quality": f"{folder}/quality.json"}
    if kind == "file":
        return {"weights": source}
    return {}


def prepare_files(wildcards, input, output):
    """--pretrained: the input file, the open_clip tag, or nothing; on a pretrain_clip model, the
    pretraining gate (pretrain.min_zeroshot_acc) on its quality record. (The source itself is the
    rule's source param.)"""
    flags = {"--pretrained": input.get("weights", pretrained_source()) or None}
    if "quality" in input.keys():
        flags.update({"--quality": input.quality, "--min-zeroshot-acc": config["pretrain"]["min_zeroshot_acc"]})
    return {**flags, "--out": output[0]}


def prepare_settings(wildcards):
    return {"--arch": wildcards.model}


rule prepare_model:
    input:
        unpack(prepare_model_input),
    output:
        f"{R}/models/{{model}}/zeroshot/model.safetensors",
    params:
        source=pretrained_source(),
        files=job_files(prepare_files),
        settings=job_settings("prepare_model", prepare_settings),
    threads: 1
    log: job_log("prepare_model", "{model}"),
    benchmark: job_benchmark("prepare_model", "{model}"),
    conda: "../envs/saeft.yaml"
    shell:
        "saeft prepare {params.files} {params.settings} > {log} 2>&1"


def head_files(wildcards, input, output):
    return {"--model": input.model, "--out": output[0]}


def head_settings(wildcards):
    """--dataset, and the dataset's options where its classes or templates are reduced."""
    options = dataset_options(wildcards.dataset) if reductions(wildcards.dataset) else None
    return {"--dataset": wildcards.dataset, "--dataset-options": options}


rule build_zeroshot_head:
    input:
        model=f"{R}/models/{{model}}/zeroshot/model.safetensors",
    output:
        f"{R}/models/{{model}}/zeroshot/heads/{{dataset}}.safetensors",
    params:
        files=job_files(head_files),
        settings=job_settings("build_zeroshot_head", head_settings),
    threads: 1
    log: job_log("build_zeroshot_head", "{model}/{dataset}"),
    benchmark: job_benchmark("build_zeroshot_head", "{model}/{dataset}"),
    conda: "../envs/saeft.yaml"
    shell:
        "saeft head {params.files} {params.settings} --threads {threads} > {log} 2>&1"
