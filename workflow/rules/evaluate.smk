# Evaluation of the zero-shot model, of every fine-tuned model, and of WiSE-FT interpolations
# (run {method}/seed{N}/alpha{A}: built in memory from the fine-tuned and zero-shot weights):
# one job per run, which loads the model once and scores every eval split of the dataset, then
# its transfer sets, into one bundle JSON (evals.json: a result record per eval set, by name).


# A transfer set (transfer.<dataset>: [...]) is an eval set named by its dataset: its test split,
# scored through its own zero-shot head on the (fine-tuned) image encoder.


def run_model_inputs(model, dataset, run):
    """The weights an evaluated run reads: the zero-shot model and its head, or a fine-tuned
    model (plus the zero-shot model and head a WiSE-FT interpolation mixes it with)."""
    if run == "zeroshot":
        return {"model": zeroshot_model(), "head": zeroshot_head(dataset)}
    trained, _, alpha = run.partition("/alpha")
    inputs = {"model": f"{R}/finetune/{model}/{dataset}/{trained}/model.safetensors"}
    if alpha:
        inputs.update(zeroshot=zeroshot_model(), zeroshot_head=zeroshot_head(dataset))
    return inputs


def eval_sets(dataset):
    """A run's eval sets, in the order the bundle holds them: the dataset's eval splits, then its
    transfer sets."""
    return [*get_dataset(dataset).eval_splits, *TRANSFER.get(dataset, [])]


def evaluate_inputs(wildcards):
    """The run's weights, the check markers of every split it reads, and the transfer sets' heads."""
    checks = [marker for evalset in eval_sets(wildcards.dataset)
              for marker in check_marker(*transfer_split(wildcards.dataset, evalset))]
    return {"checks": checks, "transfer_heads": [zeroshot_head(t) for t in TRANSFER.get(wildcards.dataset, [])],
            **run_model_inputs(wildcards.model, wildcards.dataset, wildcards.run)}


def evaluation_source(wildcards):
    """--split (the dataset's eval splits) and --transfer (each transfer set with its head)."""
    source = "--split " + " ".join(get_dataset(wildcards.dataset).eval_splits)
    transfer = TRANSFER.get(wildcards.dataset, [])
    return source + (" --transfer " + " ".join(f"{name}={zeroshot_head(name)}" for name in transfer) if transfer else "")


def evaluation_identity(wildcards):
    trained, _, alpha = wildcards.run.partition("/alpha")
    method, _, seed = trained.partition("/seed")
    if alpha:
        method = wiseft_name(method)
    identity = {"study": STUDY, "model": wildcards.model, "method": method, "seed": int(seed) if seed else None}
    if alpha:  # the WiSE-FT curve point; absent elsewhere, so results made before it was recorded stay valid
        identity["alpha"] = float(alpha)
    return as_json(identity)


def wiseft_args(wildcards, input):
    alpha = wildcards.run.partition("/alpha")[2]
    if not alpha:
        return ""
    return f"--alpha {alpha} --zeroshot-model {input.zeroshot} --zeroshot-head {input.zeroshot_head}"


rule evaluate_model:
    input:
        unpack(evaluate_inputs),
    output:
        f"{R}/eval/{{model}}/{{dataset}}/{{run}}/evals.json",
    params:
        options=lambda wildcards: as_json(dataset_options(wildcards.dataset)),
        source=evaluation_source,
        transfer_options=lambda wildcards: as_json({name: dataset_options(name) for name in TRANSFER.get(wildcards.dataset, [])}),
        identity=evaluation_identity,
        head=lambda wildcards, input: f"--head {input.head}" if "head" in input.keys() else "",
        wiseft=wiseft_args,
        cfg=as_json(config["evaluate"]),
        track=track("evaluate_model"),
    log:
        f"logs/{STUDY}/evaluate_model/{{model}}/{{dataset}}/{{run}}.log",
    benchmark:
        f"benchmarks/{STUDY}/evaluate_model/{{model}}/{{dataset}}/{{run}}.tsv"
    resources:
        gpu=1,
    shell:
        "saeft evaluate --model {input.model} {params.head} {params.wiseft} --dataset {wildcards.dataset} {params.source}"
        " --dataset-options {params.options:q} --transfer-options {params.transfer_options:q} --identity {params.identity:q}"
        " --config {params.cfg:q} --out {output} --threads {threads} --track {params.track:q} > {log} 2>&1"
