"""The ``torchdkm`` command-line application: ``compress`` (a YAML recipe end to end), ``inspect``, ``demo``.

Built on the library (``torchdkm``'s core modules, ``torchdkm.serialization``, ``torchdkm.export``); the library
never imports this package."""
