# make serve: the service on the embedded tiny preset (CPU).  make test: the test suite.
# make batch: examples/batch.jsonl through `pusa batch` on a local Ray, into out/batch.
.PHONY: install serve run test batch

install:
	./scripts/install.sh

serve: install
	.venv/bin/pusa-serve serve_config.local.yaml

run: install
	.venv/bin/pusa generate --prompt "A cat walks on the grass, realistic" --steps 4 -o out/t2v.mp4

test: install
	.venv/bin/python -m pytest -q

batch: install
	.venv/bin/pusa batch examples/batch.jsonl --output out/batch
