from crce.logs import job_log
from crce.quality import run_quality

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_quality(
        features=list(snakemake.input),
        categories=p.categories,
        labels=p.labels,
        settings=p.settings,
        feature_settings=p.features,
        runtime=vars(p.runtime),
        output=snakemake.output.table,
        figure=snakemake.output.figure,
    )
