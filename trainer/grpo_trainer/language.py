"""Language consistency: how much of a completion's prose is written in the target language.

Open-RS saw its policy drift into other languages mid-reasoning and proposed rewarding language
consistency. The score of a completion is the share of its prose words that lingua (offline,
all 75 languages, high-accuracy mode) assigns to the target language. Prose is what remains once
math (``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``, math environments), LaTeX commands, tags and
numbers are removed; it is judged sentence by sentence, and a CJK character counts as one word.
Sentences of fewer than :data:`MIN_WORDS` words, and those where no language is clearly ahead,
are not judged; a completion with nothing left to judge scores 1.0 (nothing in it is in another
language).

Every scan here is a single linear pass, whatever the text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lingua import Language, LanguageDetector

MIN_WORDS = 3
MIN_RELATIVE_DISTANCE = 0.05

_MATH_ENVIRONMENTS = frozenset(
    "equation align alignat gather multline eqnarray flalign math displaymath split aligned gathered "
    "cases array matrix pmatrix bmatrix vmatrix Vmatrix smallmatrix".split()
)
# Tokens that open or close math, found in one left-to-right pass. \$ is a literal dollar sign.
_DELIMITER = re.compile(r"\\\$|\$\$|\$|\\[\[\]()]|\\(begin|end)\{([A-Za-z]{1,20})\*?\}")
_CLOSER = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"} | {
    f"\\begin{{{environment}}}": f"\\end{{{environment}}}" for environment in _MATH_ENVIRONMENTS
}
_SENTENCE_END = re.compile(r"[.!?。！？\n]+")
_COMMAND_OR_TAG = re.compile(r"\\[A-Za-z]+|<[^<>\n]{0,40}>")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A CJK character, or a run of other letters (digits and underscores are not letters).
_WORD = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")


def prose(text: str) -> str:
    """The text outside math. Unclosed math runs to the end of the text."""
    kept: list[str] = []
    start, closer = 0, None
    for token in _DELIMITER.finditer(text):
        delimiter, begin_or_end, environment = token.group(0, 1, 2)
        if begin_or_end:  # \begin{align} opens math, \end{align} closes it; other environments are prose
            delimiter = f"\\{begin_or_end}{{{environment}}}" if environment in _MATH_ENVIRONMENTS else None
        if closer is None and delimiter in _CLOSER:
            kept.append(text[start : token.start()])
            closer, start = _CLOSER[delimiter], token.end()
        elif closer is not None and delimiter == closer:
            closer, start = None, token.end()
    if closer is None:
        kept.append(text[start:])
    return " ".join(kept)


def prose_sentences(text: str) -> list[list[str]]:
    """The words of each sentence of the completion's prose, LaTeX commands, tags and numbers removed."""
    sentences = _SENTENCE_END.split(_COMMAND_OR_TAG.sub(" ", prose(text)))
    return [words for words in (_WORD.findall(sentence) for sentence in sentences) if words]


@lru_cache(maxsize=1)
def _detector() -> LanguageDetector:
    """Built once per process; its models load as text needs them (all of them: ~10 s, ~1 GB)."""
    from lingua import LanguageDetectorBuilder

    # Undecided unless one language is clearly ahead: math-stripped sentences are short, and a
    # close call ("Let be a tetrahedron such that": Welsh 0.11, Latin 0.10, English 0.07) is noise.
    return LanguageDetectorBuilder.from_all_languages().with_minimum_relative_distance(MIN_RELATIVE_DISTANCE).build()


def target_language(code: str) -> Language:
    """lingua's language for an ISO 639-1 code; ValueError if lingua has no such language."""
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
    except AttributeError:
        raise ValueError(f"reward 'language': {code!r} is not an ISO 639-1 code lingua knows") from None


def language_consistency(completions: Sequence[str], language: str = "en") -> list[float]:
    """Share of each completion's prose words in ``language`` (ISO 639-1), in input order.

    score = Σ words of judged sentences detected as ``language`` / Σ words of judged sentences,
    or 1.0 when no sentence could be judged. The sentences of the whole batch are detected in one
    call, which lingua spreads over all cores.
    """
    target = target_language(language)
    owners: list[int] = []
    sentences: list[str] = []
    weights: list[int] = []
    for index, completion in enumerate(completions):
        for words in prose_sentences(completion):
            if len(words) >= MIN_WORDS:
                owners.append(index)
                sentences.append(" ".join(words))
                weights.append(len(words))
    detected = _detector().detect_languages_in_parallel_of(sentences) if sentences else []
    in_target = [0] * len(completions)
    judged = [0] * len(completions)
    for owner, weight, found in zip(owners, weights, detected, strict=True):
        if found is None:  # lingua could not decide: the sentence is not judged
            continue
        judged[owner] += weight
        in_target[owner] += weight if found == target else 0
    return [hits / total if total else 1.0 for hits, total in zip(in_target, judged, strict=True)]
