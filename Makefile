# make run: generate a video with the embedded tiny preset on the CPU.  make test: the test suite.
.PHONY: install run test bench-cpu

install:
	./scripts/install.sh

run: install
	.venv/bin/pusa generate --prompt "A cat walks on the grass, realistic" --steps 4 -o out/t2v.mp4

test: install
	.venv/bin/python -m pytest -q
