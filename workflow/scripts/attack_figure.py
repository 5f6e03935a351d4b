from crce.figures import attack_figure
from crce.logs import job_log

with job_log(snakemake.log[0]):
    attack_figure(snakemake.input[0], snakemake.wildcards.category, snakemake.output[0])
