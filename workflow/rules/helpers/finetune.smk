# The input, file and settings functions of the rules in ../finetune.smk (Snakemake's linter wants
# rules and functions in separate files).


def finetune_inputs(wildcards):
    """The zero-shot model and head, the check markers of the splits it reads, and what the method
    needs (registry): the SAE it names, the teacher cache of f_0 (unless the teacher runs live)."""
    spec = get_dataset(wildcards.dataset)
    inputs = {
        "model": zeroshot_model(),
        "head": zeroshot_head(wildcards.dataset),
        "checks": check_marker(wildcards.dataset, spec.train_split) + check_marker(wildcards.dataset, spec.heldout_split),
    }
    if needs(wildcards.method, "sae"):
        inputs["sae"] = sae_path(wildcards.model, wildcards.dataset, method_params(wildcards.method, wildcards.dataset).get("sae"))
    teacher = teacher_cache(wildcards.model, wildcards.dataset) if needs(wildcards.method, "teacher") else None
    if teacher:
        inputs["teacher"] = teacher
    return inputs


def finetune_files(wildcards, input, output):
    return {
        "--model": input.model,
        "--head": input.head,
        "--sae": input.get("sae"),
        "--teacher-cache": input.get("teacher"),
        "--out-model": output.model,
        "--out-json": output.summary,
    }


def pretrain_schedule():
    """pretrain_clip's schedule when the study pretrains its own model, so that train.json records
    the fine-tuning regime against it (lr_ratio, summed_lr_ratio); None (no flag) otherwise."""
    if pretrained_kind(config["model"]["pretrained"]) != "pipeline":
        return None
    return {key: config["pretrain"][key] for key in ("lr", "steps", "warmup_steps")}


def finetune_settings(wildcards):
    return {
        "--dataset": wildcards.dataset,
        "--dataset-options": dataset_options(wildcards.dataset),
        "--config": method_config(wildcards.method, wildcards.seed, wildcards.dataset),
        "--pretrain-schedule": pretrain_schedule(),
    }
