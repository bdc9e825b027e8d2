"""scripts/run_transformers_tests.py: the import swap and the junit counting (the runs themselves need
transformers' test sources, which are not in this repository: see docs/deviations.md)."""
import importlib.util
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "run_transformers_tests.py")


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("run_transformers_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


SOURCE = '''from transformers import DetrConfig, MaskFormerConfig, SwinConfig, is_torch_available
from transformers.utils import cached_property, is_vision_available

if is_torch_available():
    from transformers import (
        MaskFormerForInstanceSegmentation as Model,
        MaskFormerModel,
    )
    from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput
config = MaskFormerConfig.from_backbone_and_decoder_configs(backbone_config=None)
'''


def test_swap_moves_only_our_names_and_keeps_layout(harness):
    ours = {"MaskFormerConfig", "MaskFormerForInstanceSegmentation", "MaskFormerModel",
            "MaskFormerForInstanceSegmentationOutput"}
    out, notes = harness.swap_imports(SOURCE, ours, {("transformers.utils", "cached_property"): "functools"}, swap=True)
    lines = out.splitlines()
    assert lines[0] == "from transformers import DetrConfig, SwinConfig, is_torch_available"
    assert lines[1] == "from maskformer import MaskFormerConfig"
    assert "from transformers.utils import is_vision_available" in lines and "from functools import cached_property" in lines
    assert "    from maskformer import MaskFormerForInstanceSegmentation as Model, MaskFormerModel" in lines
    assert "    from maskformer import MaskFormerForInstanceSegmentationOutput" in lines
    assert any("compat: cached_property" in n for n in notes)
    compile(out, "swapped", "exec")
    baseline, _ = harness.swap_imports(SOURCE, ours, {}, swap=False)
    assert baseline == SOURCE  # the transformers copy is left as it is


def test_junit_counts_per_file(harness, tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.models.a.test_x.T" name="test_ok"/>'
        '<testcase classname="tests.models.a.test_x.T" name="test_bad"><failure message="AttributeError: no">x</failure></testcase>'
        '<testcase classname="tests.models.a.test_x.T" name="test_skip"><skipped message="why"/></testcase>'
        '<testcase classname="" name="tests.models.b.test_y"><error message="ImportError: z">y</error></testcase>'
        '</testsuite></testsuites>'
    )
    counts = harness.count_junit(str(junit))
    a, b = counts["tests/models/a/test_x.py"], counts["tests/models/b/test_y.py"]
    assert (a.passed, a.failed, a.skipped) == (1, 1, 1) and a.failures == {"T::test_bad": "AttributeError: no"}
    assert (b.passed, b.failed, b.skipped) == (0, 1, 0)


def test_calls_transformers_dropped_are_rewritten(harness):
    import transformers

    out, notes = harness.rewrite_missing_calls(SOURCE)
    if hasattr(transformers.MaskFormerConfig, "from_backbone_and_decoder_configs"):
        assert out == SOURCE and not notes
    else:  # transformers 5.x
        assert "config = MaskFormerConfig(backbone_config=None)" in out.splitlines() and notes
