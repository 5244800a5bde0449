# Fine-tuning per dataset, method and seed.


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model=f"{R}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}/model.safetensors",
        summary=f"{R}/finetune/{{model}}/{{dataset}}/{{method}}/seed{{seed}}/train.json",
    log:
        job_log("finetune", "{model}/{dataset}/{method}/seed{seed}"),
    benchmark:
        job_benchmark("finetune", "{model}/{dataset}/{method}/seed{seed}")
    conda:
        SAEFT_ENV
    threads: 1
    resources:
        gpu=1,
    params:
        files=job_files(finetune_files),
        settings=job_settings("finetune", finetune_settings),
    shell:
        "saeft finetune {params.files} {params.settings} --threads {threads} > {log} 2>&1"
