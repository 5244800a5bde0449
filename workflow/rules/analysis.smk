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


rule analyze_features:
    input:
        unpack(analysis_inputs),
    output:
        summary=f"{R}/analysis/{{model}}/{{dataset}}/{{run}}/features.json",
        images=f"{R}/analysis/{{model}}/{{dataset}}/{{run}}/images.parquet",
    params:
        options=lambda wildcards: as_json(dataset_options(wildcards.dataset)),
        identity=evaluation_identity,
        head=lambda wildcards, input: f"--head {input.head}" if "head" in input.keys() else "",
        wiseft=wiseft_args,
        caches=lambda wildcards, input: " ".join(
            f"{split}={path}" for split, path in zip(get_dataset(wildcards.dataset).eval_splits, input.caches)
        ),
        cfg=as_json(analysis_config()),
        track=track("analyze_features"),
    log:
        f"logs/{STUDY}/analyze_features/{{model}}/{{dataset}}/{{run}}.log",
    benchmark:
        f"benchmarks/{STUDY}/analyze_features/{{model}}/{{dataset}}/{{run}}.tsv"
    shell:
        "saeft analyze-features --model {input.model} {params.head} {params.wiseft} --dataset {wildcards.dataset}"
        " --dataset-options {params.options:q} --cache {params.caches} --sae {input.sae}"
        " --identity {params.identity:q} --config {params.cfg:q} --out-json {output.summary}"
        " --out-images {output.images} --threads {threads} --track {params.track:q} > {log} 2>&1"


rule plot_feature_cards:
    input:
        images=lambda wildcards: [analysis_path(wildcards.dataset, run, "images.parquet") for run in analysis_runs()],
        sae=lambda wildcards: sae_path(wildcards.model, wildcards.dataset),
        head=lambda wildcards: zeroshot_head(wildcards.dataset),
    output:
        [
            in_report(path, "figure_cards", "{dataset}") if path.endswith(".png") else path
            for path in (f"{R}/analysis/{{model}}/{{dataset}}/cards/{name}" for name in card_files())
        ],
    params:
        images=lambda wildcards, input: " ".join(
            f"{run_method(run)}={path}" for run, path in zip(analysis_runs(), input.images)
        ),
        options=lambda wildcards: as_json(dataset_options(wildcards.dataset)),
        out_dir=lambda wildcards: f"{R}/analysis/{wildcards.model}/{wildcards.dataset}/cards",
        cfg=as_json(config["analysis"]["cards"]),
        track=track("plot_feature_cards"),
    log:
        f"logs/{STUDY}/plot_feature_cards/{{model}}/{{dataset}}.log",
    benchmark:
        f"benchmarks/{STUDY}/plot_feature_cards/{{model}}/{{dataset}}.tsv"
    shell:
        "saeft feature-cards --images {params.images} --sae {input.sae} --head {input.head}"
        " --dataset {wildcards.dataset} --dataset-options {params.options:q} --config {params.cfg:q}"
        " --out-dir {params.out_dir} --threads {threads} --track {params.track:q} > {log} 2>&1"


rule aggregate_features:
    input:
        analyses=[analysis_path(d, run, "features.json") for d in DATASETS for run in analysis_runs()],
        images=[analysis_path(d, run, "images.parquet") for d in DATASETS for run in analysis_runs()],
        evals=eval_results(),
    output:
        tables=[path if path.endswith(".md") else in_report(path, "table_features") for path in FEATURE_TABLES],
        figures=[in_report(path, "figure_features") for path in FEATURE_FIGURES],
    params:
        tables=f"{R}/tables",
        figures=f"{R}/figures",
        top=config["analysis"]["top_features"],
        cfg=as_json(config["aggregate"]),
        track=track("aggregate_features"),
    log:
        f"logs/{STUDY}/aggregate_features.log",
    benchmark:
        f"benchmarks/{STUDY}/aggregate_features.tsv"
    shell:
        "saeft aggregate-features --analyses {input.analyses} --images {input.images} --evals {input.evals}"
        " --top {params.top} --tables {params.tables} --figures {params.figures}"
        " --config {params.cfg:q} --track {params.track:q} > {log} 2>&1"
