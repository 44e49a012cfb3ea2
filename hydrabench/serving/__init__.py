"""vLLM: servers, the in-process engine, their client, exports and the plugin."""
