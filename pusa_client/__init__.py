"""A command-line client of the service's HTTP API (`pusa client`): httpx and tqdm, no model, no Ray."""
