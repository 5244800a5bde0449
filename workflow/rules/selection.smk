# Which variant of each method with several (a grid, named variants) the study reports: the best
# on ID validation over the selection seeds (or, selection.rule one_se, the first listed within one
# standard error of it). A checkpoint: once it has run, the selected variant trains on the other
# seeds and WiSE-FT interpolates it (common.smk: selected_variant).


checkpoint select_variants:
    input:
        select_variants_inputs,
    output:
        f"{R}/selection/{{model}}/{{dataset}}/selection.json",
    log:
        job_log("select_variants", "{model}/{dataset}"),
    benchmark:
        job_benchmark("select_variants", "{model}/{dataset}")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        files=job_files(select_variants_files),
        settings=job_settings("select_variants", select_variants_settings),
    shell:
        "saeft select-variants {params.files} {params.settings} > {log} 2>&1"
