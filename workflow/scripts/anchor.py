from crce.anchors import run_anchor
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_anchor(
        split_path=snakemake.input[0],
        captions=p.captions,
        settings=p.settings,
        runtime=vars(p.runtime),
        output=snakemake.output[0],
        server_log=p.server_log,
    )
