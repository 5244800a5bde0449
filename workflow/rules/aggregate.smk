# The study's tables and figures, built from the evaluation results and training logs on disk;
# every one of them is in `snakemake --report results/report.html`.


rule aggregate_tables:
    input:
        unpack(aggregate_inputs),
    output:
        aggregate_outputs(),
    log:
        job_log("aggregate_tables"),
    benchmark:
        job_benchmark("aggregate_tables")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        files=job_files(aggregate_tables_files),
        settings=job_settings("aggregate_tables", aggregate_tables_settings),
    shell:
        "saeft aggregate {params.files} {params.settings} > {log} 2>&1"
