# The study's tables and figures, built from the evaluation results and training logs on disk;
# every one of them is in `snakemake --report results/report.html`.


def aggregate_tables_files(wildcards, input, output):
    return {"--evals": list(input.evals), "--train": list(input.train)}


def aggregate_tables_settings(wildcards):
    return {"--tables": f"{R}/tables", "--figures": f"{R}/figures", "--config": aggregate_config()}


rule aggregate_tables:
    input:
        evals=eval_results(curve=True),
        train=train_summaries(),
    output:
        aggregate_outputs(),
    params:
        files=job_files(aggregate_tables_files),
        settings=job_settings("aggregate_tables", aggregate_tables_settings),
    log: job_log("aggregate_tables"),
    benchmark: job_benchmark("aggregate_tables"),
    shell:
        "saeft aggregate {params.files} {params.settings} > {log} 2>&1"
