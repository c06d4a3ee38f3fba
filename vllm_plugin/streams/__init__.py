"""Live video streams behind HTTP: session state and causal DTD (:mod:`.session`), the conversation
through the model's chat template (:mod:`.prompt`), the service that talks to the engine
(:mod:`.service`), OpenAI response shapes (:mod:`.openai_format`), the FastAPI routes and endpoint
plugin (:mod:`.routes`), and forwarding between API-server processes (:mod:`.forward`)."""
