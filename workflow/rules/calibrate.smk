# Is the world calibrated? Per dataset, the effects established methods show on CLIP (zero-shot
# competent in ID, FT trading some OOD for ID, WiSE-FT bowing, one basin, LP-FT and FLYP ahead
# of FT OOD), measured from the study's own runs of the baselines, never SAE-FT's
# (saeft.report.calibration). The aggregate turns the records into tables/calibration.{csv,md} and
# withholds the comparison's reading where a gate criterion (calibration.gate) fails.
# Its input and flag functions are in common.smk (calibration).


rule calibrate:
    input:
        unpack(calibrate_inputs),
    output:
        f"{R}/calibration/{{model}}/{{dataset}}/calibration.json",
    log:
        job_log("calibrate", "{model}/{dataset}"),
    benchmark:
        job_benchmark("calibrate", "{model}/{dataset}")
    conda:
        SAEFT_ENV
    threads: 2
    resources:
        gpu=1,
    params:
        files=job_files(calibrate_files),
        settings=job_settings("calibrate", calibrate_settings),
    shell:
        "saeft calibrate {params.files} {params.settings} --threads {threads} > {log} 2>&1"
