from crce.figures import table6_heatmap
from crce.logs import job_log

with job_log(snakemake.log[0]):
    table6_heatmap(snakemake.input[0], snakemake.wildcards.metric, snakemake.output[0])
