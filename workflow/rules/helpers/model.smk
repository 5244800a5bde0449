# The input, file and settings functions of the rules in ../model.smk (Snakemake's linter wants
# rules and functions in separate files).


def pretrain_files(wildcards, input, output):
    return {"--out": output.weights, "--quality": output.quality}


def pretrain_settings(wildcards):
    return {"--arch": wildcards.model, "--dataset-options": dataset_options(pretrain_dataset()), "--config": pretrain_config()}


def prepare_model_input(wildcards):
    """The pretrain_clip output when the study pretrains its own model, else a local file (or none)."""
    source = pretrained_source()
    kind = pretrained_kind(source)
    if kind == "pipeline":
        folder = f"{R}/pretrain/{wildcards.model}"
        return {"weights": f"{folder}/model.safetensors", "quality": f"{folder}/quality.json"}
    if kind == "file":
        return {"weights": source}
    return {}


def prepare_files(wildcards, input, output):
    """--pretrained: the input file, the open_clip tag, or nothing; on a pretrain_clip model, the
    pretraining gate (pretrain.min_zeroshot_acc) on its quality record. (The source itself is the
    rule's source param.)"""
    flags = {"--pretrained": input.get("weights", pretrained_source()) or None}
    if "quality" in input.keys():
        flags.update({"--quality": input.quality, "--min-zeroshot-acc": config["pretrain"]["min_zeroshot_acc"]})
    return {**flags, "--out": output[0]}


def prepare_settings(wildcards):
    return {"--arch": wildcards.model}


def head_files(wildcards, input, output):
    return {"--model": input.model, "--out": output[0]}


def head_settings(wildcards):
    """--dataset, and the dataset's options where its classes or templates are reduced."""
    options = dataset_options(wildcards.dataset) if reductions(wildcards.dataset) else None
    return {"--dataset": wildcards.dataset, "--dataset-options": options}
