#!/usr/bin/env bash
# Run the libraries' own common test suites, unmodified, against diffusers-var's components.
#
#   conformance/run.sh TRANSFORMERS_TESTS DIFFUSERS_TESTS [pytest args]
#
# TRANSFORMERS_TESTS: the tests/ folder of the installed transformers version (e.g. from its sdist:
#   pip download transformers==X --no-binary :all: --no-deps, then unpack); DIFFUSERS_TESTS: the tests/ folder of a
#   diffusers checkout. Both are copied to conformance/.upstream/ (git-ignored) as the packages `transformers_tests`
#   and `diffusers_tests`; files the transformers sdist lacks are stood in for (see stand_ins below). Needs pytest,
#   parameterized, requests-mock and pytest-timeout. Logs go to conformance/logs/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
transformers_tests="$(cd "$1" && pwd)"; diffusers_tests="$(cd "$2" && pwd)"; shift 2
python="${PYTHON:-$here/../.venv/bin/python}"
upstream="$here/.upstream"
rm -rf "$upstream" && mkdir -p "$upstream" "$here/logs"
cp -r "$transformers_tests" "$upstream/transformers_tests"
cp -r "$diffusers_tests" "$upstream/diffusers_tests"
touch "$upstream/transformers_tests/__init__.py"

# stand-ins for what a transformers sdist does not ship but test_modeling_common imports
stand_in() { mkdir -p "$(dirname "$1")"; touch "$(dirname "$1")/__init__.py"; [ -f "$1" ] || printf '%s\n' "$2" > "$1"; }
stand_in "$upstream/transformers_tests/exporters/test_export.py" \
  "class ExportTesterMixin:  # stand-in: export tests (torch.export, ONNX, ...) are not run
    pass"
stand_in "$upstream/transformers_tests/generation/test_utils.py" \
  "class GenerationTesterMixin:  # stand-in: VARTransformer cannot generate, so nothing is lost
    pass"
stand_in "$upstream/transformers_tests/utils/test_configuration_utils.py" \
  "# stand-in: non-default values for the attributes every PreTrainedConfig has (what ConfigTester sets and reads)
config_common_kwargs = {
    'return_dict': False, 'output_hidden_states': True, 'output_attentions': True, 'dtype': 'float16',
    'chunk_size_feed_forward': 5, 'architectures': ['BertModel'], 'id2label': {0: 'label'},
    'label2id': {'label': '0'}, 'problem_type': 'regression',
}"

export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$upstream:$here${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"
options=(-p no:cacheprovider -q --timeout=300 -rfEs --tb=short -W ignore::DeprecationWarning "$@")
status=0
for suite in transformer vqvae pipeline scheduler; do
  "$python" -m pytest "${options[@]}" "test_var_${suite}.py" > "logs/${suite}.log" 2>&1 || status=1
  echo "${suite}: $(tail -1 "logs/${suite}.log")"
done
# diagnostics: the pipeline suite with VAR-style class labels (an int, not DiT's nested [[1], [1]] batches), and
# pipeline-level layerwise casting switched on
"$python" -m pytest "${options[@]}" variants/test_var_pipeline_variant.py \
  -k "VARPipelineVariantTests or layerwise_casting_inference" > logs/pipeline_variant.log 2>&1 || true
echo "pipeline with VAR-style labels (diagnostic): $(tail -1 logs/pipeline_variant.log)"
exit $status
