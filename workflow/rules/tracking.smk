# The run's two background processes, started before the first job and stopped after the last:
# the warm worker (saeft.infra.worker), which runs the jobs of a local run without their start-up
# imports, and the MLflow sync (saeft sync-tracking --follow), which creates the store, the
# experiment and the study's parent run, then sends each job's spooled tracking within seconds
# of its end. Runs that could not be sent (server down) wait in mlflow-queue/ until
# `snakemake sync_mlflow` replays them.


onstart:
    background.start(STUDY, tracking_queue(), os.path.join("logs", STUDY, "workflow"), workflow.local_exec)


onsuccess:
    background.stop()
    if queued_tracking():
        logger.warning(
            f"{len(queued_tracking())} job(s) queued their MLflow tracking in {tracking_queue()}: "
            "replay with `snakemake sync_mlflow` once the store answers"
        )


onerror:
    background.stop()


rule sync_mlflow:
    log:
        job_log("sync_mlflow"),
    conda:
        SAEFT_ENV
    threads: 1
    # No output: a target rule that runs whenever it is asked for.
    params:
        queue=tracking_queue(),
    shell:
        "saeft sync-tracking --queue {params.queue:q} > {log} 2>&1"
