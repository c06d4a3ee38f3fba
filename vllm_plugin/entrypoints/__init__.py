"""API-server side of the plugin: per-request DTD options (:mod:`.options`), per-request stats and
counters (:mod:`.request_stats`), the ``x-dtd-stats`` header (:mod:`.middleware`) and every patch of
a vLLM internal (:mod:`.vllm_patches`)."""
