"""Run transformers' own DeepSeek-V4 model tests with ``apply_mhc_kernels`` applied to every model they build.

    python bench/run_transformers_tests.py TRANSFORMERS_CHECKOUT [--unpatched] [--json OUT] [-- PYTEST_ARGS...]

TRANSFORMERS_CHECKOUT is a clone of huggingface/transformers (ideally at the tag of the installed
version, so that its tests match the installed code). The script imports nothing from the checkout
but its tests: the installed transformers is the one under test. Every ``DeepseekV4Model`` and
``DeepseekV4ForCausalLM`` is patched as soon as its ``__init__`` returns (so models built by
``from_pretrained``, ``from_config``, on the meta device or eagerly are all patched); ``--unpatched``
runs the same tests on the plain models, for the baseline. It prints the pass/fail/skip counts and
the failed tests, and with ``--json`` writes them to a file. The exit status is pytest's.

Tests need ``parameterized`` and the checkout's test helpers; the ones that need a GPU, several
processes or the Hub skip themselves as they do in transformers' CI.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

TEST_FILE = Path("tests/models/deepseek_v4/test_modeling_deepseek_v4.py")


def patch_every_deepseek_v4_model() -> None:
    """Make every DeepSeek-V4 model built from now on come out patched (in this process)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    from torch_mhc.integrations.deepseek_v4 import apply_mhc_kernels

    def patched(original):
        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            apply_mhc_kernels(self)

        return __init__

    for cls in (v4.DeepseekV4Model, v4.DeepseekV4ForCausalLM):
        cls.__init__ = patched(cls.__init__)


class Outcomes:
    """A pytest plugin that counts the outcome of every test (setup errors and call failures alike)."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            outcome = "skipped" if report.skipped else report.outcome
            if report.when != "call" and outcome == "failed":
                outcome = "error"
            self.outcomes.setdefault(report.nodeid, outcome)
            if outcome in ("failed", "error"):
                self.outcomes[report.nodeid] = outcome

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a clone of huggingface/transformers")
    parser.add_argument("--unpatched", action="store_true", help="run on the plain models (the baseline)")
    parser.add_argument("--json", type=Path, help="write {counts, failed} here")
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []  # more pytest arguments, e.g. -k save
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    checkout = args.checkout.resolve()
    if not (checkout / TEST_FILE).is_file():
        parser.error(f"{checkout} has no {TEST_FILE}: pass a transformers checkout")
    import pytest

    if not args.unpatched:
        patch_every_deepseek_v4_model()
    os.chdir(checkout)
    sys.path.insert(0, str(checkout))  # the tests import their helpers as the package ``tests``
    outcomes = Outcomes()
    status = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(checkout), str(TEST_FILE),
                          *pytest_args], plugins=[outcomes])
    failed = sorted(k for k, v in outcomes.outcomes.items() if v in ("failed", "error"))
    label = "unpatched" if args.unpatched else "patched with apply_mhc_kernels"
    print(f"\nDeepSeek-V4 tests, {label}: {outcomes.counts()}")
    for nodeid in failed:
        print(f"  {outcomes.outcomes[nodeid].upper()} {nodeid}")
    if args.json:
        args.json.write_text(json.dumps({"patched": not args.unpatched, "counts": outcomes.counts(),
                                         "failed": failed}, indent=1) + "\n")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
