# The input, file and settings functions of the rules in ../data.smk (Snakemake's linter wants
# rules and functions in separate files).


def check_dataset_files(wildcards, input, output):
    return {"--out": output[0]}


def check_dataset_settings(wildcards):
    return {"--dataset": wildcards.dataset, "--dataset-options": check_options(wildcards.dataset), "--split": wildcards.split}
