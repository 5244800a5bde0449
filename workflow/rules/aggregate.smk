# The study's tables and figures, built from the evaluation results and training logs on disk;
# every one of them is in `snakemake --report results/report.html`.


def aggregate_tables_flags(wildcards, input, output):
    return {"--evals": list(input.evals), "--train": list(input.train), "--tables": f"{R}/tables",
            "--figures": f"{R}/figures", "--config": aggregate_config()}


rule aggregate_tables:
    input:
        evals=eval_results(curve=True),
        train=train_summaries(),
    output:
        aggregate_outputs(),
    params:
        args=job_args("aggregate_tables", aggregate_tables_flags),
    log: job_log("aggregate_tables"),
    benchmark: job_benchmark("aggregate_tables"),
    shell:
        "saeft aggregate {params.args} > {log} 2>&1"
