# Evaluation of the zero-shot model, of every fine-tuned model, and of WiSE-FT interpolations
# (run {method}/seed{N}/alpha{A}: built in memory from the fine-tuned and zero-shot weights).


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


def evaluate_inputs(wildcards):
    read_dataset, read_split = transfer_split(wildcards.dataset, wildcards.evalset)
    inputs = {"check": check_marker(read_dataset, read_split),
              **run_model_inputs(wildcards.model, wildcards.dataset, wildcards.run)}
    if read_dataset != wildcards.dataset:  # a transfer set is scored through its own head
        inputs["head"] = zeroshot_head(read_dataset)
    return inputs


def evaluation_source(wildcards):
    """--dataset/--split (and --transfer-from) of the evaluation."""
    read_dataset, read_split = transfer_split(wildcards.dataset, wildcards.evalset)
    source = f"--dataset {read_dataset} --split {read_split}"
    return source + (f" --transfer-from {wildcards.dataset}" if read_dataset != wildcards.dataset else "")


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
        f"{R}/eval/{{model}}/{{dataset}}/{{run}}/{{evalset}}.json",
    params:
        options=lambda wildcards: as_json(dataset_options(transfer_split(wildcards.dataset, wildcards.evalset)[0])),
        source=evaluation_source,
        identity=evaluation_identity,
        head=lambda wildcards, input: f"--head {input.head}" if "head" in input.keys() else "",
        wiseft=wiseft_args,
        cfg=as_json(config["evaluate"]),
        track=track("evaluate_model"),
    log:
        f"logs/{STUDY}/evaluate_model/{{model}}/{{dataset}}/{{run}}/{{evalset}}.log",
    benchmark:
        f"benchmarks/{STUDY}/evaluate_model/{{model}}/{{dataset}}/{{run}}/{{evalset}}.tsv"
    resources:
        gpu=1,
    shell:
        "saeft evaluate --model {input.model} {params.head} {params.wiseft} {params.source}"
        " --dataset-options {params.options:q} --identity {params.identity:q}"
        " --config {params.cfg:q} --out {output} --threads {threads} --track {params.track:q} > {log} 2>&1"
