"""`clipq doctor`: what clipq runs on."""

from __future__ import annotations

import sys

from clipq.workflows import doctor


def add_doctor(sub) -> None:
    """`clipq doctor`: the installation check"""
    p = sub.add_parser("doctor", help="check the installation: Caffe build, Python packages, BLAS, data",
                       description="Print versions and locations of Caffe (and which source it was built "
                                   "from), numpy, protobuf, GPyOpt, BLAS and the datasets. Exit 1 if "
                                   "something required is missing.")
    p.set_defaults(func=_doctor)


def _doctor(args) -> int:
    return 0 if doctor.report(sys.stdout) else 1
