# The zero-shot model: pretrained by the pipeline itself on the captioned corpus of dataset
# pretrain.dataset (offline studies; the shapes world by default) or taken from open_clip weights,
# then materialised as one local safetensors file with a zero-shot head per dataset.


rule pretrain_clip:
    output:
        weights=f"{R}/pretrain/{{model}}/model.safetensors",
        quality=f"{R}/pretrain/{{model}}/quality.json",
    log:
        job_log("pretrain_clip", "{model}"),
    benchmark:
        job_benchmark("pretrain_clip", "{model}")
    conda:
        SAEFT_ENV
    threads: pretrain_threads
    resources:
        gpu=1,
    params:
        files=job_files(pretrain_files),
        settings=job_settings("pretrain_clip", pretrain_settings),
    shell:
        "saeft pretrain {params.files} {params.settings} --threads {threads} > {log} 2>&1"


rule prepare_model:
    input:
        unpack(prepare_model_input),
    output:
        f"{R}/models/{{model}}/zeroshot/model.safetensors",
    log:
        job_log("prepare_model", "{model}"),
    benchmark:
        job_benchmark("prepare_model", "{model}")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        source=pretrained_source(),
        files=job_files(prepare_files),
        settings=job_settings("prepare_model", prepare_settings),
    shell:
        "saeft prepare {params.files} {params.settings} > {log} 2>&1"


rule build_zeroshot_head:
    input:
        model=f"{R}/models/{{model}}/zeroshot/model.safetensors",
    output:
        f"{R}/models/{{model}}/zeroshot/heads/{{dataset}}.safetensors",
    log:
        job_log("build_zeroshot_head", "{model}/{dataset}"),
    benchmark:
        job_benchmark("build_zeroshot_head", "{model}/{dataset}")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        files=job_files(head_files),
        settings=job_settings("build_zeroshot_head", head_settings),
    shell:
        "saeft head {params.files} {params.settings} --threads {threads} > {log} 2>&1"
