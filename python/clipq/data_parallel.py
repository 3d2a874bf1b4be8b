"""`python -m clipq.data_parallel`: one MPI rank of data-parallel `clipq train` (the command mpirun starts on
every machine; see `clipq train --help`). The trainer is `clipq.caffe.data_parallel`."""

from clipq.caffe.data_parallel import main

if __name__ == "__main__":
    raise SystemExit(main())
