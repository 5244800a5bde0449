# What fine-tuning added to and removed from the embeddings, in zero-shot SAE features: one job per
# fine-tuned run (every eval set of its dataset), feature cards per dataset, then tables and figures
# joined with the evaluation results. Runs when analysis.enabled (default).


def analysis_inputs(wildcards):
    """The run's model (as evaluate_model reads it), the dataset's main SAE, and the zero-shot
    embedding caches of its eval splits."""
    spec = get_dataset(wildcards.dataset)
    return {
        **run_model_inputs(wildcards.model, wildcards.dataset, wildcards.run),
        "sae": sae_path(wildcards.model, wildcards.dataset),
        "caches": [f"{R}/cache/{wildcards.model}/{wildcards.dataset}/{split}.h5" for split in spec.eval_splits],
    }


def analyze_files(wildcards, input, output):
    caches = [f"{split}={path}" for split, path in zip(get_dataset(wildcards.dataset).eval_splits, input.caches)]
    return {**run_model_files(wildcards, input), "--cache": caches, "--sae": input.sae,
            "--out-json": output.summary, "--out-images": output.images}


def analyze_settings(wildcards):
    return {"--dataset": wildcards.dataset, "--dataset-options": dataset_options(wildcards.dataset),
            "--identity": evaluation_identity(wildcards), "--config": analysis_config()}


rule analyze_features:
    input:
        unpack(analysis_inputs),
    output:
        summary=f"{R}/analysis/{{model}}/{{dataset}}/{{run}}/features.json",
        images=f"{R}/analysis/{{model}}/{{dataset}}/{{run}}/images.parquet",
    params:
        files=job_files(analyze_files),
        settings=job_settings("analyze_features", analyze_settings),
    threads: 1
    log: job_log("analyze_features", "{model}/{dataset}/{run}"),
    benchmark: job_benchmark("analyze_features", "{model}/{dataset}/{run}"),
    conda: "../envs/saeft.yaml"
    resources: gpu=1
    shell:
        "saeft analyze-features {params.files} {params.settings} --threads {threads} > {log} 2>&1"


def card_inputs(wildcards):
    """The images.parquet of every analysed run, the dataset's main SAE and zero-shot head."""
    return {"images": [analysis_path(wildcards.dataset, run, "images.parquet") for run in analysis_runs(wildcards.dataset)],
            "sae": sae_path(wildcards.model, wildcards.dataset), "head": zeroshot_head(wildcards.dataset)}


def card_outputs():
    """The cards of every table row, in the report (the figures), and their index."""
    paths = [f"{R}/analysis/{{model}}/{{dataset}}/cards/{name}" for name in card_files()]
    return [in_report(path, "figure_cards", "{dataset}") if path.endswith(".png") else path for path in paths]


def cards_files(wildcards, input, output):
    images = [f"{RunId.parse(run).row}={path}" for run, path in zip(analysis_runs(wildcards.dataset), input.images)]
    return {"--images": images, "--sae": input.sae, "--head": input.head, "--out-dir": os.path.dirname(output[0])}


def cards_settings(wildcards):
    return {"--dataset": wildcards.dataset, "--dataset-options": dataset_options(wildcards.dataset),
            "--config": config["analysis"]["cards"]}


rule plot_feature_cards:
    input:
        unpack(card_inputs),
    output:
        card_outputs(),
    params:
        files=job_files(cards_files),
        settings=job_settings("plot_feature_cards", cards_settings),
    threads: 1
    log: job_log("plot_feature_cards", "{model}/{dataset}"),
    benchmark: job_benchmark("plot_feature_cards", "{model}/{dataset}"),
    conda: "../envs/saeft.yaml"
    shell:
        "saeft feature-cards {params.files} {params.settings} --threads {threads} > {log} 2>&1"


def aggregate_features_inputs(wildcards):
    """The analyses of the reported runs and their evaluations (known once the variants are
    selected: a function of the checkpoint)."""
    return {"analyses": analysis_files("features.json"), "images": analysis_files("images.parquet"),
            "evals": eval_results(selected_only=True)}


def aggregate_features_files(wildcards, input, output):
    # Until select_variants has run, Snakemake plans with its output as the only input.
    return {**{f"--{name}": list(input.get(name, [])) for name in ("analyses", "images", "evals")},
            "--tables": os.path.dirname(output.tables[0]), "--figures": os.path.dirname(output.figures[0])}


def aggregate_features_settings(wildcards):
    return {"--top": config["analysis"]["top_features"], "--config": config["aggregate"]}


rule aggregate_features:
    input:
        unpack(aggregate_features_inputs),
    output:
        tables=[path if path.endswith(".md") else in_report(path, "table_features") for path in FEATURE_TABLES],
        figures=[in_report(path, "figure_features") for path in FEATURE_FIGURES],
    params:
        files=job_files(aggregate_features_files),
        settings=job_settings("aggregate_features", aggregate_features_settings),
    threads: 1
    log: job_log("aggregate_features"),
    benchmark: job_benchmark("aggregate_features"),
    conda: "../envs/saeft.yaml"
    shell:
        "saeft aggregate-features {params.files} {params.settings} > {log} 2>&1"
