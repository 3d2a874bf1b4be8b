"""The Caffe adapter: the only clipq package that imports pycaffe. Prototxts, caffemodels and solvers in and out
(`caffe_io`, `caffemodel`), what Caffe would abort on checked first (`preflight`), plain nets to method nets and
back (`convert`, `param_str`), `caffe train` resumably (`train`) or over MPI (`data_parallel`), the NetSpec
generators of prototxt/ (`nets`) and the build itself (`build`)."""

import os

os.environ.setdefault("GLOG_minloglevel", "2")  # before pycaffe loads: Caffe's per-layer setup log stays out
