"""vLLM plugin applying Differential Token Drop (TimeChat-Online) to video requests."""


def register() -> None:
    """Entry point for ``vllm.general_plugins`` (filled in by the serving plugin)."""
