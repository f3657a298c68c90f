"""The Keras backend (needs the ``keras`` extra: tensorflow, keras, tf2onnx).

Import :mod:`bnfuse.keras.backend` to get :class:`~bnfuse.keras.backend.KerasBackend`;
this package itself imports nothing heavy.

Modules: ``graph`` (editable view of a model config), ``rules`` (which layers absorb a BN
and how), ``fuse`` (the fold pass), ``io`` (load/save), ``runtime`` (runner, benchmark
targets, stats), ``backend`` (the :class:`~bnfuse.backend.Backend` implementation).
"""
