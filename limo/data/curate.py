"""`python -m limo.data.curate` points to `python -m limo.curate`.

Curation samples with eval's sampler and grades with its grader, so it is a package of its own
above data and eval (docs/ARCHITECTURE.md), not a module of data. This name stays for anyone who
reads the original issue's command: it says where the tool is and imports nothing above data.
"""

import sys

if __name__ == "__main__":
    sys.exit("error: curation is `python -m limo.curate` (the same options; README.md, Curation): it sits above eval, "
             "whose sampler and grader it uses, so it cannot live inside data")
