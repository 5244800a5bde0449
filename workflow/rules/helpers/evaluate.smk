# The input, file and settings functions of the rules in ../evaluate.smk (Snakemake's linter wants
# rules and functions in separate files).


# A transfer set (transfer.<dataset>: [...]) is an eval set named by its dataset: its test split,
# scored through its own zero-shot head on the (fine-tuned) image encoder.


def run_model_inputs(model, dataset, run):
    """The weights an evaluated run reads: the zero-shot model and its head, or a fine-tuned
    model (plus the zero-shot model and head a WiSE-FT interpolation mixes it with)."""
    run = RunId.parse(run)
    if run.zeroshot:
        return {"model": zeroshot_model(), "head": zeroshot_head(dataset)}
    inputs = {"model": f"{R}/finetune/{model}/{dataset}/{run.trained}/model.safetensors"}
    if run.alpha is not None:
        inputs.update(zeroshot=zeroshot_model(), zeroshot_head=zeroshot_head(dataset))
    return inputs


def eval_sets(dataset):
    """A run's eval sets, in the order the bundle holds them: the dataset's eval splits and ID
    validation split, then its transfer sets."""
    return [*get_dataset(dataset).scored_splits, *TRANSFER.get(dataset, [])]


def evaluate_inputs(wildcards):
    """The run's weights, the check markers of every split it reads, and the transfer sets' heads."""
    checks = [marker for evalset in eval_sets(wildcards.dataset) for marker in check_marker(*transfer_split(wildcards.dataset, evalset))]
    return {
        "checks": checks,
        "transfer_heads": [zeroshot_head(t) for t in TRANSFER.get(wildcards.dataset, [])],
        **run_model_inputs(wildcards.model, wildcards.dataset, wildcards.run),
    }


def evaluation_identity(wildcards):
    """What the run's results are about: study, model, table row (its method, or WiSE-FT's
    name), variant (the base's for WiSE-FT), seed, and the alpha of a WiSE-FT curve point
    (absent elsewhere, so results made before it was recorded stay valid)."""
    run = RunId.parse(wildcards.run)
    identity = {"study": STUDY, "model": wildcards.model, "method": run.row, "variant": run.variant, "seed": run.seed}
    return identity if run.alpha is None else {**identity, "alpha": run.alpha}


def run_model_files(wildcards, input):
    """The evaluated model: --model, the zero-shot head (--head) or, for WiSE-FT, --alpha and the
    zero-shot model and head to mix with."""
    alpha = RunId.parse(wildcards.run).alpha
    wiseft = {} if alpha is None else {"--alpha": f"{alpha:g}", "--zeroshot-model": input.zeroshot, "--zeroshot-head": input.zeroshot_head}
    return {"--model": input.model, "--head": input.get("head"), **wiseft}


def evaluate_files(wildcards, input, output):
    return {**run_model_files(wildcards, input), "--out": output.evals, "--out-predictions": output.predictions}


def evaluate_settings(wildcards):
    """--split (the dataset's eval splits) and --transfer (each transfer set with its head)."""
    transfer = TRANSFER.get(wildcards.dataset, [])
    return {
        "--dataset": wildcards.dataset,
        "--split": list(get_dataset(wildcards.dataset).scored_splits),
        "--transfer": [f"{name}={zeroshot_head(name)}" for name in transfer] or None,
        "--dataset-options": dataset_options(wildcards.dataset),
        "--transfer-options": {name: dataset_options(name) for name in transfer},
        "--identity": evaluation_identity(wildcards),
        "--config": config["evaluate"],
    }
