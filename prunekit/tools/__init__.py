"""prunekit's tooling, apart from the library: the bundled model and its data (:mod:`.bundled`, :mod:`.data`),
``prunekit eval`` (:mod:`.evaluation`), ``prunekit bench`` (:mod:`.bench`), ``prunekit demo`` (:mod:`.demo`), the
method × adapter matrix (:mod:`.matrix`) and the ``prunekit`` command (:mod:`.cli`).

Install with ``pip install "prunekit[tools]"`` (pillow, safetensors, tqdm, matplotlib); the library (``import
prunekit``) needs none of these.
"""
