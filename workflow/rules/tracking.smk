# MLflow: the store is created once before jobs start; runs that jobs could not log (server down,
# store locked) wait in mlflow-queue/ until `snakemake sync_mlflow` replays them.


onstart:
    # Create the MLflow store, experiment and the study's parent run once: parallel jobs creating
    # them would race (jobs nest their runs under that parent). Not with SAEFT_TRACKING=off.
    if tracking_enabled():
        shell(f"saeft init-tracking --experiment {STUDY} --study {STUDY} --log-level WARNING")


onsuccess:
    if queued_tracking():
        logger.warning(f"{len(queued_tracking())} job(s) queued their MLflow tracking in {tracking_queue()}: "
                       "replay with `snakemake sync_mlflow` once the store answers")


rule sync_mlflow:
    # No output: a target rule that runs whenever it is asked for.
    params:
        queue=tracking_queue(),
    log: job_log("sync_mlflow"),
    conda: "../envs/saeft.yaml"
    shell:
        "saeft sync-tracking --queue {params.queue:q} > {log} 2>&1"
