"""Live video streams behind HTTP. A stream (:mod:`.session`) is its parts: frames and their bytes
(:mod:`.store`), the causal DTD decision (:mod:`.decision`), the conversation's chunks and
re-anchoring (:mod:`.conversation`, with a memory policy of :mod:`.memory`) and its events
(:mod:`.events`). The conversation's text goes through the model's chat template (:mod:`.prompt`),
the service talks to the engine (:mod:`.service`), :mod:`.openai_format` shapes the answers,
:mod:`.routes` is the FastAPI routes and endpoint plugin (and the only module that speaks HTTP), and
:mod:`.forward` forwards between API-server processes."""
