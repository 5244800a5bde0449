# The input, file and settings functions of the rules in ../cache.smk (Snakemake's linter wants
# rules and functions in separate files).


def cache_inputs(wildcards):
    """The zero-shot model, and the split's check marker when it is read from data_root."""
    return {"model": f"{R}/models/{wildcards.model}/zeroshot/model.safetensors", "check": check_marker(wildcards.dataset, wildcards.split)}


def cache_files(wildcards, input, output):
    return {"--model": input.model, "--out": output[0]}


def cache_settings(wildcards):
    return {
        "--pretrained": pretrained_source() or "",
        "--dataset": wildcards.dataset,
        "--dataset-options": dataset_options(wildcards.dataset),
        "--split": wildcards.split,
        "--config": config["cache"],
    }


def cache_views_settings(wildcards):
    return {**cache_settings(wildcards), "--views": view_config()}
