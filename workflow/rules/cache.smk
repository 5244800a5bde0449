# Zero-shot image embeddings per model, dataset and split, in HDF5; and of every view of the
# training bank when fine-tuning augments (the teacher cache of the feature and SAE methods).


rule cache_activations:
    input:
        unpack(cache_inputs),
    output:
        f"{R}/cache/{{model}}/{{dataset}}/{{split}}.h5",
    log:
        job_log("cache_activations", "{model}/{dataset}/{split}"),
    benchmark:
        job_benchmark("cache_activations", "{model}/{dataset}/{split}")
    conda:
        SAEFT_ENV
    threads: 1
    resources:
        gpu=1,
    params:
        files=job_files(cache_files),
        settings=job_settings("cache_activations", cache_settings),
    shell:
        "saeft cache {params.files} {params.settings} --threads {threads} > {log} 2>&1"


rule cache_views:
    input:
        unpack(cache_inputs),
    output:
        f"{R}/cache/{{model}}/{{dataset}}/{{split}}.views.h5",
    log:
        job_log("cache_views", "{model}/{dataset}/{split}"),
    benchmark:
        job_benchmark("cache_views", "{model}/{dataset}/{split}")
    conda:
        SAEFT_ENV
    threads: 1
    params:
        files=job_files(cache_files),
        settings=job_settings("cache_views", cache_views_settings),
    shell:
        "saeft cache {params.files} {params.settings} --threads {threads} > {log} 2>&1"
