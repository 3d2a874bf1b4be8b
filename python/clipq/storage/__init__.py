"""The `.clipq` format: the sparse codec (`sparse_codec`, its numba `kernels`, optional `huffman` coding) and the
storage accounting and tables (`size`). Pure numpy: no Caffe."""
