# The input, file and settings functions of the rules in ../selection.smk (Snakemake's linter wants
# rules and functions in separate files).


def select_variants_inputs(wildcards):
    """The evaluations of every variant on the selection seeds."""
    return [eval_path(wildcards.dataset, run) for run in selection_runs()]


def select_variants_files(wildcards, input, output):
    return {"--evals": list(input), "--out": output[0]}


def select_variants_settings(wildcards):
    return {
        "--variants": {m: {v: method_params(v, wildcards.dataset) for v in VARIANTS[m]} for m in GRIDDED},
        "--seeds": SELECTION_SEEDS,
        "--oracle": json.dumps(config["selection"]["oracle"]),
        "--rule": config["selection"]["rule"],
        # The config's order (the JSON of --variants is written with sorted keys): ties and one_se go by it.
        "--order": {m: list(VARIANTS[m]) for m in GRIDDED},
    }
