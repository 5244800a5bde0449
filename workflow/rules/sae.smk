# Sparse autoencoders per dataset, trained on the zero-shot embeddings of its SAE training split
# (many ID images; `sae.data: pretrain`: the pretraining corpus); metrics on the held-out split
# and on every evaluation split (with the dataset's zero-shot head: how much task information
# the reconstructions keep). `sae:` is the SAE the SAE methods use; `sae.sweep:` lists extra
# SAEs (overrides of `sae:`), trained together in one job, one folder each.


rule train_sae:
    input:
        unpack(sae_inputs),
    output:
        weights=f"{R}/sae/{{model}}/{{dataset}}/sae.safetensors",
        metrics=f"{R}/sae/{{model}}/{{dataset}}/sae.json",
    log:
        job_log("train_sae", "{model}/{dataset}"),
    benchmark:
        job_benchmark("train_sae", "{model}/{dataset}")
    conda:
        SAEFT_ENV
    threads: 1
    resources:
        gpu=1,
    params:
        files=job_files(sae_files),
        settings=job_settings("train_sae", sae_settings),
    shell:
        "saeft train-sae {params.files} {params.settings} --threads {threads} > {log} 2>&1"


if SAE_SWEEP:

    rule train_sae_sweep:
        input:
            unpack(sae_sweep_inputs),
        output:
            [f"{R}/sae/{{model}}/{{dataset}}/{name}/{leaf}" for name in SAE_SWEEP for leaf in ("sae.safetensors", "sae.json")],
        log:
            job_log("train_sae_sweep", "{model}/{dataset}"),
        benchmark:
            job_benchmark("train_sae_sweep", "{model}/{dataset}")
        conda:
            SAEFT_ENV
        threads: 1
        resources:
            gpu=1,
        params:
            files=job_files(sae_sweep_files),
            settings=job_settings("train_sae_sweep", sae_sweep_settings),
        shell:
            "saeft train-sae-sweep {params.files} {params.settings} --threads {threads} > {log} 2>&1"
