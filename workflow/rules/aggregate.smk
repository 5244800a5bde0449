# The study's tables and figures, built from the evaluation results and training logs on disk;
# every one of them is in `snakemake --report results/report.html`.


rule aggregate_tables:
    input:
        evals=eval_results(curve=True),
        train=train_summaries(),
    output:
        aggregate_outputs(),
    params:
        tables=f"{R}/tables",
        figures=f"{R}/figures",
        cfg=as_json(aggregate_config()),
        track=track("aggregate_tables"),
    log:
        f"logs/{STUDY}/aggregate_tables.log",
    benchmark:
        f"benchmarks/{STUDY}/aggregate_tables.tsv"
    shell:
        "saeft aggregate --evals {input.evals} --train {input.train} --tables {params.tables}"
        " --figures {params.figures} --config {params.cfg:q} --track {params.track:q} > {log} 2>&1"
