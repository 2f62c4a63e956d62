"""Data: TFRecord storage (records), preparation, balanced sampling, mixup and tf.data pipelines.

Submodules are imported explicitly (``from psla_tf.data import pipeline``) so that importing
one does not pull in the others.
"""
