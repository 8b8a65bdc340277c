"""Curation: from a large pool of problems with reasoning chains to the few hundred LIMO trains on.

    python -m limo.curate --pool FILE [FILE...] --out DIR [--steps dedup,decontaminate,difficulty,score,select]

One module per step, each reading the previous step's records and writing its own under
DIR/steps/<step>/ (pipeline.py runs them, resumably): dedup -> decontaminate -> difficulty ->
score -> select, then report.py. text.py holds the problem normalisation and MinHash helpers they
share; records.py the envelope a record travels in and the step files.

In the package order this sits above eval/: it grades with eval.grading and samples with
eval.sampler. Nothing in data/ or eval/ imports it.
"""
