"""Run transformers' ``ModelTesterMixin`` over one set of classes, with unittest, and collect each test's outcome.

The test class is built as transformers builds a family's own (``ModelTesterMixin``, the generation mixin where
the classes generate, ``unittest.TestCase``) under the family's test-class name. unittest honours transformers'
``require_*`` skips (unittest skips); a ``pytest.skip`` inside a test counts as a skip too.
"""

from __future__ import annotations

import time
import traceback
import unittest
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from transformers_mixins import GenerationTesterMixin, modeling_common
from transformers_suite_classes import ClassesUnderTest
from transformers_suite_tester import ModelTester


@dataclass(frozen=True)
class Outcome:
    """Each test's outcome: the failures with their error's last line, the skips with their reason."""

    passed: frozenset[str]
    failed: dict[str, str]
    skipped: dict[str, str]
    test_seconds: dict[str, float] = field(default_factory=dict)

    def lost_from(self, stock: Outcome) -> dict[str, str]:
        """The tests ``stock`` passes that this run fails or skips, each with its error line or skip reason."""
        return {name: self.failed.get(name) or f"skipped: {self.skipped.get(name)}"
                for name in sorted(stock.passed - self.passed)}

    def as_json(self) -> dict[str, Any]:
        return {"passed": sorted(self.passed), "failed": self.failed, "skipped": self.skipped,
                "test_seconds": self.test_seconds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(frozenset(data["passed"]), data["failed"], data["skipped"], data.get("test_seconds", {}))


def case_class_for(classes: ClassesUnderTest) -> type[unittest.TestCase]:
    family = classes.family
    kwargs = classes.config_kwargs

    def set_up(self: unittest.TestCase) -> None:
        self.model_tester = ModelTester(self, classes.config_class, kwargs, family.inputs, kwargs[family.width_key],
                                        kwargs[family.heads_key], kwargs[family.layers_key])

    generates = any(model_class.can_generate() for model_class in classes.model_classes)
    bases = (modeling_common().ModelTesterMixin, *((GenerationTesterMixin,) if generates else ()), unittest.TestCase)
    # test_can_init_all_missing_weights runs only for families whose config file's copyright is 2023 or later: a
    # generated module has its modeling file's header (Qwen2's has none), so it runs for every family here
    return type(family.test_class_name, bases, {"all_model_classes": classes.model_classes, "setUp": set_up,
                                                "is_encoder_decoder": family.inputs == "seq2seq",
                                                "test_can_init_all_missing_weights_before_2023": True})


def run_tests(classes: ClassesUnderTest, names: Iterable[str] | None = None) -> Outcome:
    """Run the named tests (default: all of them) of the mixin over ``classes``."""
    case_class = case_class_for(classes)
    chosen = list(names) if names is not None else unittest.TestLoader().getTestCaseNames(case_class)
    result = _Collector()
    unittest.TestSuite(case_class(name) for name in chosen).run(result)
    failed = {name: line for name, line in result.failed.items()}
    skipped = {name: reason for name, reason in result.skipped.items() if name not in failed}
    return Outcome(frozenset(chosen) - set(failed) - set(skipped), failed, skipped, result.seconds)


class _Collector(unittest.TestResult):
    """Keeps each test's outcome by method name; a failed subtest fails its test, a skipped one skips only itself."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802 (unittest's name)
        super().startTest(test)
        self._started = time.perf_counter()

    def stopTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        self.seconds[test._testMethodName] = time.perf_counter() - self._started
        super().stopTest(test)

    def addError(self, test: unittest.TestCase, err) -> None:  # noqa: N802
        if _is_pytest_skip(err):
            self.skipped[test._testMethodName] = str(err[1])
        else:
            self.failed[test._testMethodName] = _one_line(err)

    def addFailure(self, test: unittest.TestCase, err) -> None:  # noqa: N802
        self.failed[test._testMethodName] = _one_line(err)

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err) -> None:  # noqa: N802
        if err is not None and not _is_pytest_skip(err):
            (self.addFailure if issubclass(err[0], test.failureException) else self.addError)(test, err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
        if test._testMethodName != "runTest":  # a skipped subtest: its test ran, and fails or passes on the rest
            self.skipped[test._testMethodName] = reason

    def addExpectedFailure(self, test: unittest.TestCase, err) -> None:  # noqa: N802
        self.skipped[test._testMethodName] = "expected failure"


def _is_pytest_skip(err) -> bool:
    return err[0].__module__.startswith("_pytest") and err[0].__name__ in ("Skipped", "XFailed")


def _one_line(err) -> str:
    text = " ".join("".join(traceback.format_exception_only(err[0], err[1])).split())
    return text[:400] or err[0].__name__
