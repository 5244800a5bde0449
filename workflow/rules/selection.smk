# Which variant of each method with several (a grid, named variants) the study reports: the best
# on ID validation over the selection seeds (or, selection.rule one_se, the first listed within one
# standard error of it). A checkpoint: once it has run, the selected variant trains on the other
# seeds and WiSE-FT interpolates it (common.smk: selected_variant).


def select_variants_inputs(wildcards):
    """The evaluations of every variant on the selection seeds."""
    return [eval_path(wildcards.dataset, run) for run in selection_runs()]


def select_variants_files(wildcards, input, output):
    return {"--evals": list(input), "--out": output[0]}


def select_variants_settings(wildcards):
    return {"--variants": {m: {v: method_params(v, wildcards.dataset) for v in VARIANTS[m]} for m in GRIDDED},
            "--seeds": SELECTION_SEEDS, "--oracle": json.dumps(config["selection"]["oracle"]), "--rule": config["selection"]["rule"],
            # The config's order (the JSON of --variants is written with sorted keys): ties and one_se go by it.
            "--order": {m: list(VARIANTS[m]) for m in GRIDDED}}


checkpoint select_variants:
    input:
        select_variants_inputs,
    output:
        f"{R}/selection/{{model}}/{{dataset}}/selection.json",
    params:
        files=job_files(select_variants_files),
        settings=job_settings("select_variants", select_variants_settings),
    threads: 1
    log: job_log("select_variants", "{model}/{dataset}"),
    benchmark: job_benchmark("select_variants", "{model}/{dataset}"),
    conda: "../envs/saeft.yaml"
    shell:
        "saeft select-variants {params.files} {params.settings} > {log} 2>&1"
