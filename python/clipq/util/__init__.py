"""What every layer of clipq may use: its error type, atomic outputs, locks, process handling, cache paths and
the numba kernels' fixed-chunk parallelism. Imports nothing of clipq's."""
