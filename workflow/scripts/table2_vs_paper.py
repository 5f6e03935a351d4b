from crce.logs import job_log
from crce.metrics import run_table2_versus_paper

with job_log(snakemake.log[0]):
    run_table2_versus_paper(
        distances=snakemake.input[0],
        concept=snakemake.params.paper_concept,
        output=snakemake.output[0],
    )
