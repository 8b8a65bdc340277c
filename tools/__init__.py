"""What every layer uses and no layer owns: progress bars that read well in a log."""
