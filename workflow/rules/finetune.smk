# Fine-tuning per dataset, method and seed.


def finetune_inputs(wildcards):
    """The zero-shot model and head, the check markers of the splits it reads, and what the method
    needs (registry): the SAE it names, the teacher cache of f_0 (unless the teacher runs live)."""
    spec = get_dataset(wildcards.dataset)
    inputs = {"model": zeroshot_model(), "head": zeroshot_head(wildcards.dataset),
              "checks": check_marker(wildcards.dataset, spec.train_split) + check_marker(wildcards.dataset, spec.heldout_split)}
    if needs(wildcards.method, "sae"):
        inputs["sae"] = sae_path(wildcards.model, wildcards.dataset, method_params(wildcards.method, wildcards.dataset).get("sae"))
    teacher = teacher_cache(wildcards.model, wildcards.dataset) if needs(wildcards.method, "teacher") else None
    if teacher:
        inputs["teacher"] = teacher
    return inputs


def finetune_files(wildcards, input, output):
    return {"--model": input.model, "--head": input.head, "--sae": input.get("sae"), "--teacher-cache": input.get("teacher"),
            "--out-model": output.model, "--out-json": output.summary}


def pretrain_schedule():
    """pretrain_clip's schedule when the study pretrains its own model, so that train.json records
    the fine-tuning regime against it (lr_ratio, summed_lr_ratio); None (no flag) otherwise."""
    if pretrained_kind(config["model"]["pretrained"]) != "pipeline":
        return None
    return {key: config["pretrain"][key] for key in ("lr", "steps", "warmup_steps")}


def finetune_settings(wildcards):
    return {"--dataset": wildcards.dataset, "--dataset-options": dataset_options(wildcards.dataset),
            "--config": method_config(wildcards.method, wildcards.seed, wildcards.dataset),
            "--pretrain-schedule": pretrain_schedule()}


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model=f"{R}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}/model.safetensors",
        summary=f"{R}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}/train.json",
    params:
        files=job_files(finetune_files),
        settings=job_settings("finetune", finetune_settings),
    threads: 1
    log: job_log("finetune", "{model}/{dataset}/{method}/seed{seed}"),
    benchmark: job_benchmark("finetune", "{model}/{dataset}/{method}/seed{seed}"),
    conda: "../envs/saeft.yaml"
    resources: gpu=1
    shell:
        "saeft finetune {params.files} {params.settings} --threads {threads} > {log} 2>&1"
