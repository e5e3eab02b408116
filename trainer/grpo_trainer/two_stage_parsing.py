"""latex2sympy's LaTeX parser in ANTLR's two stages: SLL prediction first, full LL where SLL fails.

latex2sympy2_extended 1.0.6 parses every LaTeX answer with its generated ANTLR parser in ANTLR's
default LL prediction mode, and that parse is much of what grading a new answer costs. SLL
prediction ignores the parser's call stack when it chooses an alternative: on the answers of the
benchmark workloads it takes a third of LL's CPU time, two thirds while ANTLR is still filling its
decision tables (benchmarks/README.md, "SLL-first LaTeX parsing"), and ANTLR guarantees
that it "will either return a correct parse tree (i.e. the same parse tree that would be returned
with the LL prediction mode), or it will report a syntax error" (antlr4 ``PredictionMode.SLL``).
So :class:`SllFirstParser` parses with SLL and stops at the first syntax error, the lexer's
included; on that error it hands the input to latex2sympy's own parser as latex2sympy builds it
(LL, its error listeners and recovery), which returns today's tree or raises today's exception.
Strings such as ``x^3`` and ``a_{1}=1`` take that second stage. The guarantee is the grammar's,
not Python's: on brackets nested deep, LL runs past math-verify's alarm or the recursion limit
where SLL parses, so such strings go to LL alone (:data:`SLL_MAX_NESTING`).

The SLL stage predicts with decision tables of its own: ANTLR fills the tables it shares between
parses differently in SLL mode where the grammar has predicates (latex2sympy's has precedence
predicates), so the shared ones stay filled by LL parses only, as before.

:func:`install` hooks it into latex2sympy's ``_Latex2Sympy.create_parser``; each grader worker
calls it once (``grading.Grader``). Importing this module imports sympy (about a second), hence a
module of its own that only the workers load.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

from antlr4 import CommonTokenStream, Lexer
from antlr4.atn.ParserATNSimulator import ParserATNSimulator
from antlr4.atn.PredictionMode import PredictionMode
from antlr4.dfa.DFA import DFA
from antlr4.error.ErrorListener import ErrorListener
from antlr4.error.Errors import ParseCancellationException
from antlr4.error.ErrorStrategy import BailErrorStrategy
from antlr4.PredictionContext import PredictionContextCache
from latex2sympy2_extended.gen.PSParser import PSParser
from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

latex2sympy_create_parser = _Latex2Sympy.create_parser
"""latex2sympy's own parser factory: LL prediction, error listeners that raise its messages."""

_SLL_DECISIONS = [DFA(state, decision) for decision, state in enumerate(PSParser.atn.decisionToState)]
_SLL_CONTEXTS = PredictionContextCache()


class _CancelOnSyntaxError(ErrorListener):
    def syntaxError(self, recognizer, offendingSymbol, line, column, msg, e):
        raise ParseCancellationException(msg)


_CANCEL_ON_SYNTAX_ERROR = _CancelOnSyntaxError()


class SllFirstParser:
    """Stands in for latex2sympy's parser: ``_Latex2Sympy.parse`` calls nothing on it but ``math()``."""

    def __init__(self, create_ll_parser: Callable[[], PSParser]) -> None:
        self._create_ll_parser = create_ll_parser

    def math(self) -> Any:
        """The parse tree of the whole input (the grammar's start rule), as LL would build it."""
        try:
            return self.math_sll()
        # RecursionError too: a wrong SLL guess on deeply nested input may recurse deeper than
        # LL's path does before it fails; LL decides.
        except (ParseCancellationException, RecursionError):
            return self._create_ll_parser().math()

    def math_sll(self) -> Any:
        """The first stage alone: SLL's parse tree, or ParseCancellationException at the first syntax error."""
        parser = self._create_ll_parser()
        parser._interp = ParserATNSimulator(parser, parser.atn, _SLL_DECISIONS, _SLL_CONTEXTS)
        parser._interp.predictionMode = PredictionMode.SLL
        parser._errHandler = BailErrorStrategy()  # no recovery: an error ends the stage
        # latex2sympy builds its parser on a CommonTokenStream of its lexer
        lexer = cast(Lexer, cast(CommonTokenStream, parser.getTokenStream()).tokenSource)
        for recognizer in (parser, lexer):
            recognizer.removeErrorListeners()  # latex2sympy's raise a plain Exception
            recognizer.addErrorListener(_CANCEL_ON_SYNTAX_ERROR)
        return parser.math()


SLL_MAX_NESTING = 10
"""Strings whose brackets nest deeper go to latex2sympy's LL parser alone, as before."""


def create_sll_first_parser(converter: _Latex2Sympy, latex_str: str) -> SllFirstParser | PSParser:
    """What ``_Latex2Sympy.create_parser`` is once installed.

    Not on deep nesting: there LL's full-context prediction grows with the depth (3 to 4 s at 30
    levels of ``(`` or ``[``, past math-verify's 3 s alarm) until Python's recursion limit stops
    it (about 75 levels), where SLL parses in a second or two; the verdict would change. No text
    of the benchmark workloads nests more than 8 deep.
    """
    create_ll_parser = functools.partial(latex2sympy_create_parser, converter, latex_str)
    if _bracket_depth(latex_str) > SLL_MAX_NESTING:
        return create_ll_parser()
    return SllFirstParser(create_ll_parser)


def _bracket_depth(latex_str: str) -> int:
    depth = deepest = 0
    for char in latex_str:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}" and depth:
            depth -= 1
    return deepest


def install() -> None:
    """Make every latex2sympy parse in this process SLL first (calling it again changes nothing)."""
    setattr(_Latex2Sympy, "create_parser", create_sll_first_parser)  # noqa: B010 (a method replaced, not an attribute set)
