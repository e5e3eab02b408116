"""Language consistency: math stripped, prose judged sentence by sentence by lingua."""

from __future__ import annotations

import time

import pytest

from grpo_trainer import language
from grpo_trainer.language import language_consistency, prose, prose_sentences, target_language
from grpo_trainer.rewards import RewardScorer
from grpo_trainer.spec import RewardParams, RewardSpec

ENGLISH = "Let me compute the sum of the roots first. Then we are done with the whole problem."
CHINESE = "所以我们得到这个结果，接下来验证一下答案是否正确。"
FRENCH = "Donc la réponse est correcte, nous avons fini le calcul."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Let $ABCD$ be a square.", "Let   be a square."),
        ("Area: $$\\frac{1}{2} b h$$ done", "Area:   done"),
        ("So \\(x^2\\) and \\[y = 3\\] remain", "So   and   remain"),
        ("We get \\begin{align*} x &= 1 \\\\ y &= 2 \\end{align*} as claimed", "We get   as claimed"),
        ("Items \\begin{itemize} \\item one \\end{itemize}", "Items \\begin{itemize} \\item one \\end{itemize}"),
        ("It costs \\$5 and \\$6 in total", "It costs \\$5 and \\$6 in total"),
        ("Unclosed $x + 1 and the rest", "Unclosed "),
    ],
)
def test_prose_drops_math(text, expected):
    assert prose(text) == expected


def test_prose_sentences_drop_commands_tags_numbers_and_count_cjk_characters():
    text = f"<think>\nWe have $x=2$, so \\boxed{{27}} is 27 in total.\n{CHINESE}\n</think>"
    assert prose_sentences(text) == [
        ["We", "have", "so", "is", "in", "total"],
        list("所以我们得到这个结果接下来验证一下答案是否正确"),
    ]


def test_prose_is_linear_in_adversarial_text():
    hostile = "\\(" * 200_000 + "$" * 100_001 + "\\begin{align}" * 20_000 + "a" * 100_000
    started = time.monotonic()
    prose_sentences(hostile)
    assert time.monotonic() - started < 2.0


class ScriptDetector:
    """Stands in for lingua in the fast tests: Chinese if a sentence has a CJK character, French if
    it starts with "Donc", undecided if it starts with "Hmm", English otherwise."""

    def detect_languages_in_parallel_of(self, sentences):
        from lingua import Language

        def detect(sentence):
            if any("\u4e00" <= c <= "\u9fff" for c in sentence):
                return Language.CHINESE
            if sentence.startswith("Hmm"):
                return None
            return Language.FRENCH if sentence.startswith("Donc") else Language.ENGLISH

        return [detect(sentence) for sentence in sentences]


@pytest.fixture
def script_detector(monkeypatch):
    monkeypatch.setattr(language, "_detector", ScriptDetector)


def test_share_of_judged_words(script_detector):
    english_words = len(ENGLISH.replace(".", "").split())  # 17
    chinese_words = len("所以我们得到这个结果接下来验证一下答案是否正确")  # 23 characters
    scores = language_consistency(
        [
            f"{ENGLISH}\n{CHINESE}",
            f"{ENGLISH} Hmm not sure at all.",  # undecided: not judged
            f"{ENGLISH} Ok so.",  # two words: too short to judge
            "$\\boxed{27}$",  # nothing to judge
            "",
        ]
    )
    assert scores == [english_words / (english_words + chinese_words), 1.0, 1.0, 1.0, 1.0]


def test_language_reward_in_the_scorer(script_detector):
    scorer = RewardScorer([RewardSpec(name="language", weight=0.5, params=RewardParams(language="en"))])
    batch = scorer.score([ENGLISH, CHINESE, None, FRENCH], ["1"] * 4)
    assert batch.per_function["language"] == [1.0, 0.0, 0.0, 0.0]
    assert batch.total == [0.5, 0.0, 0.0, 0.0]
    assert batch.failures == {"language:not text": 1}


def test_unknown_target_language():
    with pytest.raises(ValueError, match="'zz'"):
        target_language("zz")


@pytest.mark.slow  # lingua loads its models once per process: ~10-20 s
def test_lingua_tells_drift_from_english():
    english_words = len(ENGLISH.replace(".", "").split())
    chinese_words = len("所以我们得到这个结果接下来验证一下答案是否正确")
    scores = language_consistency(
        [
            f"<think>\n{ENGLISH}\nSo $x^2 + 1 = 0$ has no real root.\n</think>",
            # Math-stripped English that lingua finds ambiguous is left unjudged, not called Welsh.
            "Let $ABCD$ be a tetrahedron such that $AB=CD$. Therefore the answer is $5$.",
            CHINESE,
            f"{ENGLISH}\n{CHINESE}",
            FRENCH,
        ]
    )
    assert scores[:3] == [1.0, 1.0, 0.0]
    assert scores[3] == pytest.approx(english_words / (english_words + chinese_words))
    assert scores[4] == 0.0
    assert language_consistency([FRENCH, ENGLISH], "fr") == [1.0, 0.0]
