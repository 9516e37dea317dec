"""Quality evaluation of KV caches on a real model (the application layer: it may use ``models``).

* :mod:`kivi_jax.eval.ppl`: perplexity, teacher-forced token by token through the cache;
* :mod:`kivi_jax.eval.passkey`: passkey retrieval at several context lengths and depths;
* :mod:`kivi_jax.eval.ablation`: ``SimQuantCache``, KIVI's quantization along chosen axes
  (per-token keys: the paper's ablation);
* :mod:`kivi_jax.eval.methods`: the cache settings by name (``dense``, ``kivi-2``, ...);
* :mod:`kivi_jax.eval.data`: the essays and Wikipedia text from installed wheels;
* :mod:`kivi_jax.eval.plot`, :mod:`kivi_jax.eval.report`: PNG plots, result files.

Run them with ``kivi-jax eval ppl`` / ``kivi-jax eval passkey``. Nothing here imports
``models`` at import time.
"""
