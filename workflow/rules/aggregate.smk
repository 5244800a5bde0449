# The study's tables and figures, built from the evaluation results on disk.


rule aggregate_tables:
    input:
        eval_results(),
    output:
        tables=TABLES,
        figures=FIGURES,
    params:
        tables=f"{R}/tables",
        figures=f"{R}/figures",
        cfg=as_json(config["aggregate"]),
        track=track("aggregate_tables"),
    log:
        f"logs/{STUDY}/aggregate_tables.log",
    benchmark:
        f"benchmarks/{STUDY}/aggregate_tables.tsv"
    shell:
        "saeft aggregate --evals {input} --tables {params.tables} --figures {params.figures}"
        " --config {params.cfg:q} --track {params.track:q} > {log} 2>&1"
