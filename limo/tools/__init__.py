"""What every layer uses and no layer owns: progress bars that read well in a log (progress.py)
and the dtype names configs and command lines use (dtypes.py). It imports nothing of ours."""
