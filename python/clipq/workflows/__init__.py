"""What the commands do, end to end: the pipeline and its accuracy budget (`pipeline`, `report`), the comparison
with the baselines (`compare`), model-zoo models (`zoo`), the paper's experiments (`reproduce`), several runs as
one table (`summary`), encoding and decoding whole models (`compressed_model`) and the installation check
(`doctor`)."""
