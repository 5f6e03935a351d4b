from crce.clip import run
from crce.logs import job_log

with job_log(snakemake.log[0]):
    run(
        split_path=snakemake.input.split,
        pretrained=snakemake.params.model,
        output=snakemake.output[0],
    )
