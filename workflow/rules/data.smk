# check_dataset: before any job reads a split from data_root, verify its folder layout and image
# count (saeft check-data); the marker JSON is an input of the rules that read the split's images.


rule check_dataset:
    output:
        f"{R}/checks/{{dataset}}/{{split}}.json",
    log:
        job_log("check_dataset", "{dataset}/{split}"),
    benchmark:
        job_benchmark("check_dataset", "{dataset}/{split}")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        files=job_files(check_dataset_files),
        settings=job_settings("check_dataset", check_dataset_settings),
    shell:
        "saeft check-data {params.files} {params.settings} > {log} 2>&1"
