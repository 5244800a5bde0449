# What fine-tuning added to and removed from the embeddings, in zero-shot SAE features: one job per
# fine-tuned run (every eval set of its dataset), feature cards per dataset, then tables and figures
# joined with the evaluation results. Runs when analysis.enabled (default).


rule analyze_features:
    input:
        unpack(analysis_inputs),
    output:
        summary=f"{R}/analysis/{{model}}/{{dataset}}/{{run}}/features.json",
        images=f"{R}/analysis/{{model}}/{{dataset}}/{{run}}/images.parquet",
    log:
        job_log("analyze_features", "{model}/{dataset}/{run}"),
    benchmark:
        job_benchmark("analyze_features", "{model}/{dataset}/{run}")
    conda:
        SAEFT_ENV
    threads: 1
    resources:
        gpu=1,
    params:
        files=job_files(analyze_files),
        settings=job_settings("analyze_features", analyze_settings),
    shell:
        "saeft analyze-features {params.files} {params.settings} --threads {threads} > {log} 2>&1"


rule plot_feature_cards:
    input:
        unpack(card_inputs),
    output:
        card_outputs(),
    log:
        job_log("plot_feature_cards", "{model}/{dataset}"),
    benchmark:
        job_benchmark("plot_feature_cards", "{model}/{dataset}")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        files=job_files(cards_files),
        settings=job_settings("plot_feature_cards", cards_settings),
    shell:
        "saeft feature-cards {params.files} {params.settings} --threads {threads} > {log} 2>&1"


rule aggregate_features:
    input:
        unpack(aggregate_features_inputs),
    output:
        tables=[path if path.endswith(".md") else in_report(path, "table_features") for path in FEATURE_TABLES],
        figures=[in_report(path, "figure_features") for path in FEATURE_FIGURES],
    log:
        job_log("aggregate_features"),
    benchmark:
        job_benchmark("aggregate_features")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        files=job_files(aggregate_features_files),
        settings=job_settings("aggregate_features", aggregate_features_settings),
    shell:
        "saeft aggregate-features {params.files} {params.settings} > {log} 2>&1"
