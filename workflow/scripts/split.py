from crce.lists import read_lists, write_model
from crce.logs import job_log
from crce.split import make_split

with job_log(snakemake.log[0]):
    split = make_split(read_lists(snakemake.input[0]), **snakemake.params.settings)
    write_model(split, snakemake.output[0])
