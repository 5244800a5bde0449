# check_dataset: before any job reads a split from data_root, verify its folder layout and image
# count (saeft check-data); the marker JSON is an input of the rules that read the split's images.


def check_dataset_flags(wildcards, input, output):
    return {"--dataset": wildcards.dataset, "--dataset-options": check_options(wildcards.dataset),
            "--split": wildcards.split, "--out": output[0]}


rule check_dataset:
    output:
        f"{R}/checks/{{dataset}}/{{split}}.json",
    params:
        args=job_args("check_dataset", check_dataset_flags),
    log: job_log("check_dataset", "{dataset}/{split}"),
    benchmark: job_benchmark("check_dataset", "{dataset}/{split}"),
    shell:
        "saeft check-data {params.args} > {log} 2>&1"
