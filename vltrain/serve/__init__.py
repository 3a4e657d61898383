"""The OpenAI-compatible server (`python -m vltrain.serve`): app (routes, errors), schemas (request and response
shapes), batcher (the bounded queue in front of the engine), media (fetching within limits), models (what is
served), metrics, options, server (`serve`)."""
