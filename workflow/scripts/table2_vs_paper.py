from crce.clip import run_versus_paper
from crce.logs import job_log

with job_log(snakemake.log[0]):
    run_versus_paper(
        distances=snakemake.input[0],
        concept=snakemake.params.paper_concept,
        output=snakemake.output[0],
    )
