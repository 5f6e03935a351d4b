from crce.audit import run_audit
from crce.logs import job_log

with job_log(snakemake.log[0]):
    out = snakemake.output
    run_audit(
        rows=list(snakemake.input),
        settings=snakemake.params.settings,
        table=out.table,
        sheet=out.sheet,
        page=out.page,
    )
