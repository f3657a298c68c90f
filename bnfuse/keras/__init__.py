"""The Keras backend (needs the ``keras`` extra: tensorflow, keras, tf-keras, tf2onnx).

Import :mod:`bnfuse.keras.backend` to get :class:`~bnfuse.keras.backend.KerasBackend`;
this package itself imports nothing heavy. One backend serves Keras 3 (``keras``) and
Keras 2 (``tf_keras``).

Modules: ``compat`` (what differs between Keras 3 and Keras 2; the only private Keras
API), ``detect`` (which Keras wrote a file, its stored config), ``graph`` (editable view
of a model config), ``affines`` (BN, Normalization, Rescaling read as affines), ``rules``
(which layers absorb a BN and how), ``fuse`` (the fold pass), ``io`` (load/save),
``keras2_io`` (Keras 2 load/save in the input's format), ``runtime`` (runner, benchmark
targets, stats), ``backend`` (the :class:`~bnfuse.backend.Backend` implementation).
"""
