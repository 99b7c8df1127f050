"""The lab: the studies that answer the paper's claims, their statistics, the standalone variance
table, the study figures and the bench. It imports the reference (the repository root) and never
re-implements it; nothing at the root imports the lab. Run its scripts from the root:
`python -m lab.reproduce`, `python -m lab.reproduce_sft`, `python -m lab.variance_table`,
`python -m lab.plots`, `python -m lab.bench` (lab/README.md)."""
