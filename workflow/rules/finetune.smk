# Fine-tuning per dataset, method and seed.


def finetune_inputs(wildcards):
    spec = get_dataset(wildcards.dataset)
    inputs = {"model": zeroshot_model(), "head": zeroshot_head(wildcards.dataset),
              "checks": check_marker(wildcards.dataset, spec.train_split) + check_marker(wildcards.dataset, spec.heldout_split)}
    if wildcards.method in SAE_METHODS:
        inputs["sae"] = sae_path(wildcards.model, wildcards.dataset, method_params(wildcards.method, wildcards.dataset).get("sae"))
    teacher = teacher_cache(wildcards.model, wildcards.dataset) if wildcards.method in TEACHER_METHODS else None
    if teacher:
        inputs["teacher"] = teacher
    return inputs


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model=f"{R}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}/model.safetensors",
        summary=f"{R}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}/train.json",
    params:
        options=lambda wildcards: as_json(dataset_options(wildcards.dataset)),
        cfg=lambda wildcards: method_config(wildcards.method, wildcards.seed, wildcards.dataset),
        sae=lambda wildcards, input: f"--sae {input.sae}" if "sae" in input.keys() else "",
        teacher=lambda wildcards, input: f"--teacher-cache {input.teacher}" if "teacher" in input.keys() else "",
        track=track("finetune"),
    log:
        f"logs/{STUDY}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"benchmarks/{STUDY}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    resources:
        gpu=1,
    shell:
        "saeft finetune --model {input.model} --head {input.head} {params.sae} {params.teacher}"
        " --dataset {wildcards.dataset} --dataset-options {params.options:q} --config {params.cfg:q}"
        " --out-model {output.model} --out-json {output.summary}"
        " --threads {threads} --track {params.track:q} > {log} 2>&1"
