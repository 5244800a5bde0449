# The input, file and settings functions of the rules in ../aggregate.smk (Snakemake's linter wants
# rules and functions in separate files).


def aggregate_inputs(wildcards):
    """Every evaluated run (every variant, WiSE-FT curves) with its predictions, the reported
    runs' training logs, and each dataset's selection (the checkpoint that decides them)."""
    return {
        "evals": eval_results(curve=True),
        "predictions": eval_results(curve=True, leaf="predictions.parquet"),
        "train": train_summaries(),
        "selections": [selection_file(d) for d in DATASETS] if GRIDDED else [],
        "calibrations": [calibration_file(d) for d in calibrated_datasets()],
    }


def aggregate_tables_files(wildcards, input, output):
    # Until select_variants has run, Snakemake plans with its output as the only input.
    files = {name: list(input.get(name, [])) for name in ("evals", "predictions", "train", "selections", "calibrations")}
    folders = {os.path.basename(os.path.dirname(path)): os.path.dirname(path) for path in output}  # tables/, figures/
    return {
        "--evals": files["evals"],
        "--predictions": files["predictions"],
        "--train": files["train"],
        "--selections": files["selections"] or None,
        "--calibrations": files["calibrations"] or None,
        "--tables": folders["tables"],
        "--figures": folders["figures"],
    }


def aggregate_tables_settings(wildcards):
    return {"--config": aggregate_config(), "--variants": variant_table()}
