# The input, file and settings functions of the rules in ../analysis.smk (Snakemake's linter wants
# rules and functions in separate files).


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
    return {
        **run_model_files(wildcards, input),
        "--cache": caches,
        "--sae": input.sae,
        "--out-json": output.summary,
        "--out-images": output.images,
    }


def analyze_settings(wildcards):
    return {
        "--dataset": wildcards.dataset,
        "--dataset-options": dataset_options(wildcards.dataset),
        "--identity": evaluation_identity(wildcards),
        "--config": analysis_config(),
    }


def card_inputs(wildcards):
    """The images.parquet of every analysed run, the dataset's main SAE and zero-shot head."""
    return {
        "images": [analysis_path(wildcards.dataset, run, "images.parquet") for run in analysis_runs(wildcards.dataset)],
        "sae": sae_path(wildcards.model, wildcards.dataset),
        "head": zeroshot_head(wildcards.dataset),
    }


def card_outputs():
    """The cards of every table row, in the report (the figures), and their index."""
    paths = [f"{R}/analysis/{{model}}/{{dataset}}/cards/{name}" for name in card_files()]
    return [in_report(path, "figure_cards", "{dataset}") if path.endswith(".png") else path for path in paths]


def cards_files(wildcards, input, output):
    images = [f"{RunId.parse(run).row}={path}" for run, path in zip(analysis_runs(wildcards.dataset), input.images)]
    return {"--images": images, "--sae": input.sae, "--head": input.head, "--out-dir": os.path.dirname(output[0])}


def cards_settings(wildcards):
    return {
        "--dataset": wildcards.dataset,
        "--dataset-options": dataset_options(wildcards.dataset),
        "--config": config["analysis"]["cards"],
    }


def aggregate_features_inputs(wildcards):
    """The analyses of the reported runs and their evaluations (known once the variants are
    selected: a function of the checkpoint)."""
    return {
        "analyses": analysis_files("features.json"),
        "images": analysis_files("images.parquet"),
        "evals": eval_results(selected_only=True),
    }


def aggregate_features_files(wildcards, input, output):
    # Until select_variants has run, Snakemake plans with its output as the only input.
    return {
        **{f"--{name}": list(input.get(name, [])) for name in ("analyses", "images", "evals")},
        "--tables": os.path.dirname(output.tables[0]),
        "--figures": os.path.dirname(output.figures[0]),
    }


def aggregate_features_settings(wildcards):
    return {"--top": config["analysis"]["top_features"], "--config": config["aggregate"]}
