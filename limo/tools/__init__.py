"""What every layer uses and no layer owns: progress bars that read well in a log (progress.py),
the dtype names configs and command lines use (dtypes.py), the one error type for bad input and
its one-line report (errors.py), and collectives spelled once for every torch we allow
(collectives.py). It imports nothing of ours."""
