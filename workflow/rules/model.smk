# The zero-shot model: pretrained by the pipeline itself on the captioned corpus of dataset
# pretrain.dataset (offline studies; the shapes world by default) or taken from open_clip weights,
# then materialised as one local safetensors file with a zero-shot head per dataset.


rule pretrain_clip:
    output:
        weights=f"{R}/pretrain/{{model}}/model.safetensors",
        quality=f"{R}/pretrain/{{model}}/quality.json",
    params:
        options=as_json(dataset_options(pretrain_dataset())),
        cfg=as_json(pretrain_config()),
        track=track("pretrain_clip"),
    log:
        f"logs/{STUDY}/pretrain_clip/{{model}}.log",
    benchmark:
        f"benchmarks/{STUDY}/pretrain_clip/{{model}}.tsv"
    threads: lambda wildcards: workflow.cores  # at job time: a --report or a dry run gives no --cores
    resources:
        gpu=1,
    shell:
        "saeft pretrain --arch {wildcards.model} --dataset-options {params.options:q} --config {params.cfg:q}"
        " --out {output.weights} --quality {output.quality} --threads {threads} --track {params.track:q} > {log} 2>&1"


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


def pretrained_argument(wildcards, input):
    """--pretrained for 'saeft prepare': the input file, the open_clip tag, or nothing."""
    if "weights" in input.keys():
        return f"--pretrained {input.weights}"
    source = pretrained_source()
    return f"--pretrained {source}" if source else ""


def quality_gate(wildcards, input):
    """The pretraining gate (pretrain.min_zeroshot_acc) on a pretrain_clip model's quality record."""
    if "quality" not in input.keys():
        return ""
    return f"--quality {input.quality} --min-zeroshot-acc {config['pretrain']['min_zeroshot_acc']}"


rule prepare_model:
    input:
        unpack(prepare_model_input),
    output:
        f"{R}/models/{{model}}/zeroshot/model.safetensors",
    params:
        source=pretrained_source(),
        pretrained=pretrained_argument,
        gate=quality_gate,
        track=track("prepare_model"),
    log:
        f"logs/{STUDY}/prepare_model/{{model}}.log",
    benchmark:
        f"benchmarks/{STUDY}/prepare_model/{{model}}.tsv"
    shell:
        "saeft prepare --arch {wildcards.model} {params.pretrained} {params.gate} --out {output}"
        " --track {params.track:q} > {log} 2>&1"


rule build_zeroshot_head:
    input:
        model=f"{R}/models/{{model}}/zeroshot/model.safetensors",
    output:
        f"{R}/models/{{model}}/zeroshot/heads/{{dataset}}.safetensors",
    params:
        track=track("build_zeroshot_head"),
    log:
        f"logs/{STUDY}/build_zeroshot_head/{{model}}/{{dataset}}.log",
    benchmark:
        f"benchmarks/{STUDY}/build_zeroshot_head/{{model}}/{{dataset}}.tsv"
    shell:
        "saeft head --model {input.model} --dataset {wildcards.dataset} --out {output}"
        " --threads {threads} --track {params.track:q} > {log} 2>&1"
