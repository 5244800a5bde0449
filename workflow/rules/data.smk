# check_dataset: before any job reads a split from data_root, verify its folder layout and image
# count (saeft check-data); the marker JSON is an input of the rules that read the split's images.


rule check_dataset:
    output:
        f"{R}/checks/{{dataset}}/{{split}}.json",
    params:
        options=lambda wildcards: as_json(check_options(wildcards.dataset)),
        track=track("check_dataset"),
    log:
        f"logs/{STUDY}/check_dataset/{{dataset}}/{{split}}.log",
    benchmark:
        f"benchmarks/{STUDY}/check_dataset/{{dataset}}/{{split}}.tsv"
    shell:
        "saeft check-data --dataset {wildcards.dataset} --dataset-options {params.options:q} --split {wildcards.split}"
        " --out {output} --track {params.track:q} > {log} 2>&1"
