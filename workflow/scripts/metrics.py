from crce.logs import job_log
from crce.metrics import run

with job_log(snakemake.log[0]):
    out = snakemake.output
    run(
        judgments=list(snakemake.input),
        labels=snakemake.params.labels,
        metrics_out=out.metrics,
        table_out=out.table,
        markdown_out=out.markdown,
        paper_out=out.paper,
        invalid_out=out.invalid,
    )
