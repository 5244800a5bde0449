# Evaluation of the zero-shot model and of every fine-tuned model on each evaluation split.


def evaluate_inputs(wildcards):
    if wildcards.run == "zeroshot":
        return {"model": zeroshot_model(), "head": zeroshot_head(wildcards.dataset)}
    return {"model": f"{R}/finetune/{wildcards.model}/{wildcards.dataset}/{wildcards.run}/model.safetensors"}


def evaluation_identity(wildcards):
    method, _, seed = wildcards.run.partition("/seed")
    return as_json({"study": STUDY, "model": wildcards.model, "method": method, "seed": int(seed) if seed else None})


rule evaluate_model:
    input:
        unpack(evaluate_inputs),
    output:
        f"{R}/eval/{{model}}/{{dataset}}/{{run}}/{{evalset}}.json",
    params:
        options=lambda wildcards: as_json(dataset_options(wildcards.dataset)),
        identity=evaluation_identity,
        head=lambda wildcards, input: f"--head {input.head}" if "head" in input.keys() else "",
        cfg=as_json(config["evaluate"]),
        track=track("evaluate_model"),
    log:
        f"logs/{STUDY}/evaluate_model/{{model}}/{{dataset}}/{{run}}/{{evalset}}.log",
    benchmark:
        f"benchmarks/{STUDY}/evaluate_model/{{model}}/{{dataset}}/{{run}}/{{evalset}}.tsv"
    shell:
        "saeft evaluate --model {input.model} {params.head} --dataset {wildcards.dataset}"
        " --dataset-options {params.options:q} --split {wildcards.evalset} --identity {params.identity:q}"
        " --config {params.cfg:q} --out {output} --threads {threads} --track {params.track:q} > {log} 2>&1"
