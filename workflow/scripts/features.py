from crce.logs import job_log
from crce.quality import run_features

with job_log(snakemake.log[0]):
    run_features(
        manifests=list(snakemake.input.manifests),
        settings=snakemake.params.settings,
        runtime=vars(snakemake.params.runtime),
        output=snakemake.output[0],
    )
