"""Data for Caffe: Fashion-MNIST and LMDB helpers (`datasets`), a user's labelled images read from any common
layout (`image_sources`) and written as LMDBs (`data_import`), and the experiment `clipq init` writes around
them (`experiment`)."""
