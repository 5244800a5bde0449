# Evaluation of the zero-shot model, of every fine-tuned model, and of WiSE-FT interpolations
# (run {method}/seed{N}/alpha{A}: built in memory from the fine-tuned and zero-shot weights):
# one job per run, which loads the model once and scores every eval split of the dataset, then
# its transfer sets, into one bundle JSON (evals.json: a result record per eval set, by name).


rule evaluate_model:
    input:
        unpack(evaluate_inputs),
    output:
        evals=f"{R}/eval/{{model}}/{{dataset}}/{{run}}/evals.json",
        predictions=f"{R}/eval/{{model}}/{{dataset}}/{{run}}/predictions.parquet",
    log:
        job_log("evaluate_model", "{model}/{dataset}/{run}"),
    benchmark:
        job_benchmark("evaluate_model", "{model}/{dataset}/{run}")
    conda:
        SAEFT_ENV
    threads: 1
    resources:
        gpu=1,
    params:
        files=job_files(evaluate_files),
        settings=job_settings("evaluate_model", evaluate_settings),
    shell:
        "saeft evaluate {params.files} {params.settings} --threads {threads} > {log} 2>&1"
