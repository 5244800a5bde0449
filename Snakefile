# saeft: SAE-regularised robust fine-tuning of CLIP, from embeddings to the paper's tables.
#   snakemake --cores all                                 embedded default study (offline, CPU)
#   snakemake --cores all --configfile workflow/configs/X.yaml
import os

from snakemake.utils import min_version

min_version("9.0")


# The embedded default study, unless --configfile names a study: then that file alone (plus the
# schema's defaults) is the config, so nothing of the default study leaks into it.
if not workflow.overwrite_configfiles:
    workflow.configfile(os.path.join(workflow.basedir, "config.yaml"))


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/analysis.smk"


rule all:
    input:
        all_targets(),
    default_target: True
