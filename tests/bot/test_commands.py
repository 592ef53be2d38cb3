"""bot.commands: `/draw` parsing and validation, command words, sizes, token estimate."""

from __future__ import annotations

import gc
import html
import random
import re
import subprocess
import sys
import time
import unicodedata
from dataclasses import replace
from typing import get_args

import pytest

from bot import commands, replies
from bot.chat import PlainMarkup
from bot.commands import (
    SEED_MAX,
    SIZE_PRESETS,
    DrawCommand,
    DrawRules,
    UsageCode,
    UsageError,
    UsageProblem,
    estimate_t5_tokens,
    parse_draw,
    size_for_ratio,
    split_command,
    validate_draw,
)
from bot.replies import EXAMPLES, help_text

RULES = DrawRules(
    min_steps=1, max_steps=50, default_steps=20, width=1024, height=1024, max_prompt_chars=1000, max_prompt_tokens=512
)
# Unusual limits, to catch anything that assumes the defaults (examples in messages included).
ODD_RULES = DrawRules(
    min_steps=4,
    max_steps=8,
    default_steps=6,
    width=512,
    height=768,
    max_prompt_chars=60,
    max_prompt_tokens=30,
    min_side=320,
    max_side=1024,
    max_pixels=640 * 640,
)

ERROR_CODES = {
    "empty_prompt",
    "prompt_too_long",
    "prompt_too_many_tokens",
    "bad_seed",
    "bad_steps",
    "bad_size",
    "unknown_option",
    "missing_value",
    "unexpected_value",
    "repeated_option",
    "conflicting_options",
}


def cmd(prompt: str, seed: int | None = None, steps: int = 20, width: int = 1024, height: int = 1024, as_file: bool = False):
    return DrawCommand(prompt=prompt, seed=seed, steps=steps, width=width, height=height, as_file=as_file)


# ----------------------------------------------------------------------------------------------------------------
# Valid /draw text

VALID = [
    # trailing numbers: seed, then steps
    ("a red fox 7 4", cmd("a red fox", 7, 4)),
    ("a red fox 7", cmd("a red fox", 7)),
    ("a red fox", cmd("a red fox")),
    ("   a red fox \n ", cmd("a red fox")),
    ("a fox 1 2 3", cmd("a fox 1", 2, 3)),
    ("iphone 15", cmd("iphone", 15)),
    ("a red fox -1", cmd("a red fox", None)),
    ("a red fox -1 4", cmd("a red fox", None, 4)),
    ("a red fox 0", cmd("a red fox", 0)),
    (f"a red fox {SEED_MAX}", cmd("a red fox", SEED_MAX)),
    ("a red fox +7 004", cmd("a red fox", 7, 4)),
    ("a red fox 7 50", cmd("a red fox", 7, 50)),
    ("a red fox 7 1", cmd("a red fox", 7, 1)),
    # number-like words that are not numbers stay text
    ("a poster from the 1920s", cmd("a poster from the 1920s")),
    ("the year 2049.", cmd("the year 2049.")),
    ("a fox 4k", cmd("a fox 4k")),
    ("a fox 1/2", cmd("a fox 1/2")),
    ("a fox 1,000", cmd("a fox 1,000")),
    ("a fox ７", cmd("a fox ７")),  # full-width digit: text, only ASCII digits are numbers
    # quotes
    ('"blade runner 2049"', cmd("blade runner 2049")),
    ("“blade runner 2049”", cmd("blade runner 2049")),
    ("„blade runner 2049“", cmd("blade runner 2049")),
    ("«blade runner 2049» 7 4", cmd("blade runner 2049", 7, 4)),
    ('"blade runner 2049" 7 4', cmd("blade runner 2049", 7, 4)),
    ('"  spaced out  "', cmd("spaced out")),
    ('"1984"', cmd("1984")),
    ('"--seed 5 is text"', cmd("--seed 5 is text")),
    ('a sign that says "OPEN" 7', cmd('a sign that says "OPEN"', 7)),
    ('say "hi there" and "bye"', cmd('say "hi there" and "bye"')),
    ('"blade runner" 2049 poster', cmd('"blade runner" 2049 poster')),
    ('a sign "2049" 7', cmd('a sign "2049"', 7)),
    # unbalanced or odd quotes are literal characters
    ('"unbalanced quote 5', cmd('"unbalanced quote', 5)),
    ('unbalanced quote" 5', cmd('unbalanced quote"', 5)),
    ('a "quote"inside word 3', cmd('a "quote"inside word', 3)),
    ('"', cmd('"')),  # a lone quote is a visible character like any other
    # apostrophes and single quotes are always text
    ("a cat's hat", cmd("a cat's hat")),
    ("a cat's hat 3", cmd("a cat's hat", 3)),
    ("'90s style poster 8", cmd("'90s style poster", 8)),
    ("it's 'quoted' text", cmd("it's 'quoted' text")),
    ("‘smart single’ quotes 2", cmd("‘smart single’ quotes", 2)),
    # options
    ("blade runner 2049 --seed 5", cmd("blade runner 2049", 5)),
    ("a red fox 7 4 --seed 9", cmd("a red fox 7 4", 9)),
    ("a red fox 7 --steps 4", cmd("a red fox 7", None, 4)),
    ("a red fox --seed 9 --steps 4", cmd("a red fox", 9, 4)),
    ("--seed 9 --steps 4 a red fox", cmd("a red fox", 9, 4)),
    ("a red fox --seed=9 --steps=4", cmd("a red fox", 9, 4)),
    ("a red fox seed=9 steps=4", cmd("a red fox", 9, 4)),
    ("a red fox SEED=9 Steps=4", cmd("a red fox", 9, 4)),
    ("a red fox --Seed 9 --STEPS 4", cmd("a red fox", 9, 4)),
    ("a red fox --step 4", cmd("a red fox", None, 4)),
    ("a red fox —seed 9", cmd("a red fox", 9)),
    ("a red fox --seed -1", cmd("a red fox", None)),
    ("a red fox --seed=-1", cmd("a red fox", None)),
    ("a red fox --seed random", cmd("a red fox", None)),
    ('a red fox --seed "12"', cmd("a red fox", 12)),
    ("a red fox --png", cmd("a red fox", as_file=True)),
    ("a red fox --PNG --png", cmd("a red fox", as_file=True)),
    ("a red fox --png 7 4", cmd("a red fox", 7, 4, as_file=True)),
    ("a red fox 7 --png 4", cmd("a red fox", 7, 4, as_file=True)),
    ("a red --png fox", cmd("a red fox", as_file=True)),
    ("line one --png\nline two", cmd("line one\nline two", as_file=True)),
    # em dash before an unknown word, and lone dashes, are punctuation
    ("a fox —like this", cmd("a fox —like this")),
    ("a fox -- watercolor", cmd("a fox -- watercolor")),
    ("a fox --> there", cmd("a fox --> there")),
    ("a fox -ish", cmd("a fox -ish")),
    ("E=mc2 on a blackboard", cmd("E=mc2 on a blackboard")),
    # sizes
    ("a fox --ar 16:9", cmd("a fox", width=1360, height=768)),
    ("a fox --ar 9:16", cmd("a fox", width=768, height=1360)),
    ("a fox --aspect 3:2", cmd("a fox", width=1248, height=832)),
    ("a fox ar=1:1", cmd("a fox")),
    ("a fox --ar 1:4", cmd("a fox", width=512, height=2048)),
    ("a fox --ar 4:1", cmd("a fox", width=2048, height=512)),
    ("a fox --size portrait", cmd("a fox", width=832, height=1248)),
    ("a fox --size landscape", cmd("a fox", width=1248, height=832)),
    ("a fox --size square", cmd("a fox")),
    ("a fox --size WIDE", cmd("a fox", width=1360, height=768)),
    ("a fox size=tall", cmd("a fox", width=768, height=1360)),
    ("a fox --ar portrait", cmd("a fox", width=832, height=1248)),
    ("a fox --size 768x1344", cmd("a fox", width=768, height=1344)),
    ("a fox --size 768×1344 7", cmd("a fox", 7, width=768, height=1344)),
    ("a fox --size=512X512", cmd("a fox", width=512, height=512)),
    ("a fox --size 16:9", cmd("a fox", width=1360, height=768)),
    ("a fox --size 2048x2048", cmd("a fox", width=2048, height=2048)),
    ("a fox --size 256x256", cmd("a fox", width=256, height=256)),
    # kept verbatim: unicode, mentions, markup, inner whitespace
    ("🦊 in the snow 🌨️ 5", cmd("🦊 in the snow 🌨️", 5)),
    ("👨\u200d👩\u200d👧 family portrait", cmd("👨\u200d👩\u200d👧 family portrait")),
    ("ثعلب أحمر في الثلج", cmd("ثعلب أحمر في الثلج")),
    ("\u202eevil rtl override\u202c 3", cmd("\u202eevil rtl override\u202c", 3)),
    ("雪の中の赤い狐 3 4", cmd("雪の中の赤い狐", 3, 4)),
    ("a\u200bfox", cmd("a\u200bfox")),
    ("@everyone look at this fox", cmd("@everyone look at this fox")),
    ("<b>bold</b> **fox** `code` _x_ <script>alert(1)</script>", cmd("<b>bold</b> **fox** `code` _x_ <script>alert(1)</script>")),
    ("[link](http://x) &amp; fox", cmd("[link](http://x) &amp; fox")),
    ("a  red   fox", cmd("a  red   fox")),
    ("a\tred fox\n\nin snow 7", cmd("a\tred fox\n\nin snow", 7)),
    ("a\u00a0red fox\u00a07", cmd("a\u00a0red fox", 7)),  # no-break spaces separate words too
    # control characters are removed (documented decision), newlines normalised
    ("a fox\x00 in snow", cmd("a fox in snow")),
    ("\x07ring the bell", cmd("ring the bell")),
    ("a\r\nb", cmd("a\nb")),
    ("a\rb", cmd("a\nb")),
    ("\x1b[31mred\x1b[0m fox", cmd("[31mred[0m fox")),
    ("fox\x7f\x85\x9f", cmd("fox")),
    ("fox \ud83d 5", cmd("fox", 5)),  # lone surrogate (broken emoji from a client)
    ("--se\x00ed 5 fox", cmd("fox", 5)),  # cleaned before reading options
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[repr(t)[:40] for t, _ in VALID])
def test_parse_draw_valid(text: str, expected: DrawCommand) -> None:
    assert parse_draw(text, RULES) == expected


# ----------------------------------------------------------------------------------------------------------------
# Invalid /draw text: (text, code, substrings the message must mention)

INVALID = [
    ("", "empty_prompt", ["what to draw"]),
    ("   \n\t ", "empty_prompt", ["what to draw"]),
    ("\x00\x01", "empty_prompt", ["what to draw"]),
    ("\u200b\u200d\ufeff", "empty_prompt", ["what to draw"]),
    ("\u3164", "empty_prompt", ["what to draw"]),
    ('""', "empty_prompt", ["what to draw"]),
    ('“  ”', "empty_prompt", ["what to draw"]),
    ("--png", "empty_prompt", ["what to draw"]),
    ("--seed 5 --ar 16:9", "empty_prompt", ["what to draw"]),
    ("7", "empty_prompt", ["what to draw", '"1984"']),
    ("7 4", "empty_prompt", ["what to draw", "seed and steps", '"1984"']),
    ("-1", "empty_prompt", ["what to draw", '"1984"']),
    # seeds
    ("a fox 1e9", "bad_seed", ["0 to 4294967295", "1e9", "quotes"]),
    ("a fox 0x10", "bad_seed", ["whole number", "0x10"]),
    ("a fox 1.5", "bad_seed", ["whole number", "1.5", "quotes"]),
    ("a fox -5", "bad_seed", ["out of range", "-5", "-1 for a random"]),
    ("a fox -2 4", "bad_seed", ["out of range", "-2"]),
    ("a fox 4294967296", "bad_seed", ["out of range", "4294967296", "0 to 4294967295"]),
    ("a fox " + "9" * 30, "bad_seed", ["out of range", "999999"]),
    ("a fox " + "1" * 100_000, "bad_seed", ["out of range"]),  # int() would refuse this many digits
    ("a fox --seed abc", "bad_seed", ["whole number", "abc"]),
    ("a fox --seed 1e9", "bad_seed", ["whole number", "1e9"]),
    ("a fox --seed=-2", "bad_seed", ["out of range", "-2"]),
    ("a fox --seed 1_000", "bad_seed", ["whole number", "1_000"]),
    ("a fox seed=100000000000000000000000000000", "bad_seed", ["out of range", "0 to 4294967295"]),
    ("a fox --seed ４２", "bad_seed", ["whole number"]),
    # steps
    ("a fox 1 0", "bad_steps", ["1 to 50", "“0”", "quotes"]),
    ("a fox 1 51", "bad_steps", ["1 to 50", "51"]),
    ("a fox 1 -3", "bad_steps", ["1 to 50", "-3"]),
    ("a fox 1 2.5", "bad_steps", ["1 to 50", "2.5"]),
    ("a fox --steps 1000000000", "bad_steps", ["1 to 50", "1000000000"]),
    ("a fox --steps many", "bad_steps", ["1 to 50", "many"]),
    ("a fox steps=0", "bad_steps", ["1 to 50"]),
    ("a fox --steps " + "9" * 5000, "bad_steps", ["1 to 50", "…"]),
    # options
    ("a fox --foo", "unknown_option", ["--foo", "--seed", "--steps", "--size", "--ar", "--png"]),
    ("--no blurry a fox", "unknown_option", ["--no", "--seed"]),
    ("a fox --seeds 3", "unknown_option", ["--seeds", "--seed"]),
    ("a fox --" + "x" * 500, "unknown_option", ["--xxxx", "…"]),
    ("a fox --seed", "missing_value", ["--seed", "needs a value"]),
    ("a fox --seed --steps 3", "missing_value", ["--seed", "needs a value"]),
    ("a fox --steps --png", "missing_value", ["--steps"]),
    ("a fox --steps seed=3", "missing_value", ["--steps"]),
    ("a fox --steps —seed 3", "missing_value", ["--steps"]),
    ("a fox --seed=", "missing_value", ["--seed"]),
    ("a fox seed=", "missing_value", ["--seed"]),
    ('a fox --seed ""', "missing_value", ["--seed"]),
    ("a fox --size", "missing_value", ["--size"]),
    ("a fox --ar", "missing_value", ["--ar", "16:9"]),
    ("a fox --seed 1 --seed 2", "repeated_option", ["--seed", "twice"]),
    ("a fox seed=1 --seed 2", "repeated_option", ["--seed", "twice"]),
    ("a fox --steps 3 --step 4", "repeated_option", ["--steps", "twice"]),
    ("a fox --ar 1:1 --size square", "conflicting_options", ["--size", "--ar"]),
    ("a fox --png=yes", "unexpected_value", ["--png", "no value"]),
    # sizes
    ("a fox --size huge", "bad_size", ["huge", "square", "portrait", "landscape", "tall", "wide", "16:9"]),
    ("a fox --ar 16/9", "bad_size", ["16/9", "square"]),
    ("a fox --size 770x1350", "bad_size", ["multiples of 16", "770x1350", "768x1344"]),
    ("a fox --size 100x100", "bad_size", ["256", "2048", "100x100"]),
    ("a fox --size 4096x1024", "bad_size", ["256", "2048", "4096x1024"]),
    ("a fox --size 0x0", "bad_size", ["0x0"]),
    ("a fox --ar 10:1", "bad_size", ["1:4", "4:1", "10:1"]),
    ("a fox --ar 0:1", "bad_size", ["0:1"]),
    ("a fox --ar 16:0", "bad_size", ["16:0"]),
    # length
    ("x" * 1001, "prompt_too_long", ["1001", "1000"]),
    ("x" * 1001 + " 7 4", "prompt_too_long", ["1001", "1000"]),
    ("a " * 400, "prompt_too_many_tokens", ["about", "512"]),  # 799 characters, about 801 tokens by the estimate
]


@pytest.mark.parametrize(("text", "code", "mentions"), INVALID, ids=[repr(t)[:40] for t, _, _ in INVALID])
def test_parse_draw_invalid(text: str, code: str, mentions: list[str]) -> None:
    with pytest.raises(UsageError) as caught:
        parse_draw(text, RULES)
    message = str(caught.value)
    assert caught.value.code == code, message
    for part in mentions:
        assert part in message, (part, message)
    assert_good_message(message, RULES)


_EXAMPLE = re.compile(r'/draw ((?:"[^"]*"|[^\s.(]+)(?: (?:"[^"]*"|[^\s.(]+))*)')


def assert_good_message(message: str, rules: DrawRules) -> None:
    """Short, one paragraph, and every `/draw …` example in it is itself a valid command under these rules."""
    assert 20 <= len(message) <= 400, message
    assert "Traceback" not in message and "\n" not in message
    examples = _EXAMPLE.findall(message)
    assert examples, f"no example in: {message}"
    for example in examples:
        parse_draw(example, rules)  # raises if an example is wrong


EVERY_PROBLEM = [  # under ODD_RULES: steps 4-8, sides 320-1024, 640x640 pixels, 60 characters, 30 tokens
    ("a fox --foo", commands.UnknownOption),
    ("a fox --seed", commands.MissingValue),
    ("a fox --png=yes", commands.UnexpectedValue),
    ("a fox --steps 5 --steps 6", commands.RepeatedOption),
    ("a fox --size wide --ar 1:1", commands.ConflictingOptions),
    ("a fox --seed 3.5", commands.BadSeed),
    ("a fox 99999999999 4", commands.BadSeed),
    ("a fox 7 9", commands.BadSteps),
    ("a fox --ar 9:1", commands.BadRatio),
    ("a fox --ar <b>", commands.UnknownSize),
    ("a fox --size 4096x4096", commands.SizeOutOfRange),
    ("a fox --size 1000x1000", commands.SizeNotMultipleOf16),
    ("a fox --size 1024x1024", commands.TooManyPixels),
    ("7 4", commands.EmptyPrompt),
    ("x" * 61, commands.PromptTooLong),
    ("a " * 29, commands.PromptTooManyTokens),
]


def test_the_cases_below_cover_every_usage_problem_and_code() -> None:
    assert {problem for _, problem in EVERY_PROBLEM} == set(get_args(UsageProblem))
    assert {problem.code for problem in get_args(UsageProblem)} == set(get_args(UsageCode)) == ERROR_CODES


class Html(PlainMarkup):
    def escape(self, text: str) -> str:
        return html.escape(text, quote=False)


@pytest.mark.parametrize(("text", "kind"), EVERY_PROBLEM, ids=[repr(t)[:30] for t, _ in EVERY_PROBLEM])
def test_every_usage_problem_is_worded_by_replies(text: str, kind: type) -> None:
    """The parser says what is wrong as data; bot.replies words it (str(exc) is the same sentence, plain)."""
    with pytest.raises(UsageError) as caught:
        parse_draw(text, ODD_RULES)
    problem = caught.value.problem
    assert type(problem) is kind and caught.value.code == kind.code
    sentence = replies.usage_problem(PlainMarkup(), problem)
    assert sentence == str(caught.value)
    assert_good_message(sentence, ODD_RULES)  # one line, not empty, its examples valid
    assert replies.usage_problem(Html(), problem) == html.escape(sentence, quote=False)  # what a chat sees


def test_quote_hint_only_for_trailing_numbers() -> None:
    with pytest.raises(UsageError) as from_end:
        parse_draw("windows 3.1", RULES)
    with pytest.raises(UsageError) as from_option:
        parse_draw("windows --seed 3.1", RULES)
    assert "quotes" in str(from_end.value)
    assert "quotes" not in str(from_option.value)
    with pytest.raises(UsageError) as plain_empty:
        parse_draw("--png", RULES)
    assert "1984" not in str(plain_empty.value)


def test_messages_and_examples_follow_the_rules() -> None:
    # Examples in messages must be valid under odd limits too (steps 4-8, sides 320-1024, 640x640 pixels).
    for text in ["a fox 1 0", "a fox --steps", "a fox --steps 1 --steps 2", "a fox --size huge", "a fox --size 100x100",
                 "a fox --size 650x650", "a fox --size 1000x1000", "a fox --ar 9:1", "a fox --seed x", "", "--ar 1:1 --size wide",
                 "x" * 61, "a fox --foo", "a fox --seed"]:
        with pytest.raises(UsageError) as caught:
            parse_draw(text, ODD_RULES)
        assert_good_message(str(caught.value), ODD_RULES)
    with pytest.raises(UsageError, match="from 4 to 8"):
        parse_draw("a fox 1 9", ODD_RULES)
    with pytest.raises(UsageError, match="at most 409,600"):
        parse_draw("a fox --size 1024x1024", ODD_RULES)
    with pytest.raises(UsageError, match="from 320 to 1024"):
        parse_draw("a fox --size 256x256", ODD_RULES)


def test_defaults_come_from_rules() -> None:
    assert parse_draw("a fox", ODD_RULES) == DrawCommand("a fox", None, 6, 512, 768)
    assert parse_draw("a fox 3 8", ODD_RULES) == DrawCommand("a fox", 3, 8, 512, 768)


# ----------------------------------------------------------------------------------------------------------------
# Token counting


def test_real_token_counter_sees_the_final_prompt() -> None:
    seen: list[str] = []

    def count(text: str) -> int:
        seen.append(text)
        return 3

    rules = DrawRules(1, 50, 20, 1024, 1024, 1000, 512, count_tokens=count)
    assert parse_draw('"a red fox" 7 4 --png', rules).prompt == "a red fox"
    assert seen == ["a red fox"]


def test_real_token_counter_over_the_limit_is_exact() -> None:
    rules = DrawRules(1, 50, 20, 1024, 1024, 1000, 512, count_tokens=lambda text: 600)
    with pytest.raises(UsageError) as caught:
        parse_draw("a red fox", rules)
    assert caught.value.code == "prompt_too_many_tokens"
    assert "600 tokens" in str(caught.value) and "512" in str(caught.value) and "about" not in str(caught.value)
    # exactly at the limit is fine
    assert parse_draw("a red fox", DrawRules(1, 50, 20, 1024, 1024, 1000, 600, count_tokens=lambda text: 600))


def test_broken_token_counter_falls_back_to_the_estimate() -> None:
    def broken(text: str) -> int:
        raise RuntimeError("tokenizer exploded")

    rules = DrawRules(1, 50, 20, 1024, 1024, 1000, 10, count_tokens=broken)
    assert parse_draw("a red fox", rules).prompt == "a red fox"
    with pytest.raises(UsageError, match="about"):
        parse_draw("a red fox in the snow at dawn under a pale sky", rules)


def test_character_limit_is_checked_before_counting_tokens() -> None:
    calls: list[str] = []
    rules = DrawRules(1, 50, 20, 1024, 1024, 10, 512, count_tokens=lambda text: calls.append(text) or 1)
    with pytest.raises(UsageError, match="11 characters"):
        parse_draw("x" * 11, rules)
    assert calls == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 1),
        ("a", 3),
        ("a red fox", 5),  # a=2, red=1, fox=1, end=1
        ("photorealistic", 4),  # 1 + 14//5, end
        ("1920", 3),  # 1 + 4//4, end
        ("fox, 85mm!", 6),  # fox 1, ',' 1, 85 1, mm 1, '!' 1, end 1
        ("雪の中", 4),
        ("🦊", 2),
    ],
)
def test_estimate_t5_tokens(text: str, expected: int) -> None:
    assert estimate_t5_tokens(text) == expected


def test_estimate_grows_with_text() -> None:
    rng = random.Random(3)
    words = ["fox", "photorealistic", "a", "snow", "85mm", "雪", ",", "cinematic"]
    text = ""
    previous = estimate_t5_tokens(text)
    for _ in range(200):
        text += " " + rng.choice(words)
        current = estimate_t5_tokens(text)
        assert current > previous
        previous = current


# ----------------------------------------------------------------------------------------------------------------
# validate_draw (typed options)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("a red fox", 7, 4), {}, cmd("a red fox", 7, 4)),
        (("a red fox", None, None), {}, cmd("a red fox")),
        (("a red fox", -1, None), {}, cmd("a red fox", None)),
        (("a red fox", 0, 50), {}, cmd("a red fox", 0, 50)),
        (("a red fox", SEED_MAX, 1), {}, cmd("a red fox", SEED_MAX, 1)),
        (("a red fox", "12", "3"), {}, cmd("a red fox", 12, 3)),
        (("a red fox", "random", None), {}, cmd("a red fox", None)),
        (("  a red fox 7 4 --png  ", None, None), {}, cmd("a red fox 7 4 --png")),  # text only: nothing parsed out
        (('"blade runner 2049"', None, None), {}, cmd('"blade runner 2049"')),
        (("a\x00 fox\r\n", None, None), {}, cmd("a fox")),
        (("a red fox", None, None), {"size": "wide"}, cmd("a red fox", width=1360, height=768)),
        (("a red fox", None, None), {"size": "16:9"}, cmd("a red fox", width=1360, height=768)),
        (("a red fox", None, None), {"size": "768x1344"}, cmd("a red fox", width=768, height=1344)),
        (("a red fox", None, None), {"as_file": True}, cmd("a red fox", as_file=True)),
    ],
)
def test_validate_draw_valid(args: tuple, kwargs: dict, expected: DrawCommand) -> None:
    prompt, seed, steps = args
    assert validate_draw(prompt, seed, steps, RULES, **kwargs) == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "code", "same_as_text"),
    [
        (("", None, None), {}, "empty_prompt", "--png"),
        (("   ", None, None), {}, "empty_prompt", "--png"),
        (("a red fox", 2**32, None), {}, "bad_seed", "a red fox --seed 4294967296"),
        (("a red fox", -2, None), {}, "bad_seed", "a red fox --seed -2"),
        (("a red fox", 10**30, None), {}, "bad_seed", "a red fox --seed " + str(10**30)),
        (("a red fox", "abc", None), {}, "bad_seed", "a red fox --seed abc"),
        (("a red fox", None, 0), {}, "bad_steps", "a red fox --steps 0"),
        (("a red fox", None, 10**9), {}, "bad_steps", "a red fox --steps 1000000000"),
        (("a red fox", None, "x"), {}, "bad_steps", "a red fox --steps x"),
        (("a red fox", None, None), {"size": "huge"}, "bad_size", "a red fox --size huge"),
        (("x" * 1001, None, None), {}, "prompt_too_long", "x" * 1001),
    ],
)
def test_validate_draw_invalid_matches_text_messages(args: tuple, kwargs: dict, code: str, same_as_text: str) -> None:
    prompt, seed, steps = args
    with pytest.raises(UsageError) as typed:
        validate_draw(prompt, seed, steps, RULES, **kwargs)
    with pytest.raises(UsageError) as texted:
        parse_draw(same_as_text, RULES)
    assert typed.value.code == code
    assert str(typed.value) == str(texted.value)


def test_validate_draw_rejects_non_numbers_as_a_programming_error() -> None:
    with pytest.raises(TypeError):
        validate_draw("a fox", 1.5, None, RULES)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        validate_draw("a fox", True, None, RULES)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# split_command


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("/draw a fox 7", ("draw", "a fox 7", None)),
        ("/draw@MyBot a fox 7", ("draw", "a fox 7", "MyBot")),
        ("/DRAW a fox", ("draw", "a fox", None)),
        ("/Draw@mybot", ("draw", "", "mybot")),
        ("/draw", ("draw", "", None)),
        ("/draw\na fox\nsecond line ", ("draw", "a fox\nsecond line", None)),
        ("/draw   spaced  out  ", ("draw", "spaced  out", None)),
        ("  /help  ", ("help", "", None)),
        ("/start@Draw_Bot", ("start", "", "Draw_Bot")),
        ("/cancel_all now", ("cancel_all", "now", None)),
        ("/draw@MyBot\u00a0fox", ("draw", "fox", "MyBot")),
        ("/" + "a" * 32, ("a" * 32, "", None)),
        ("hello", None),
        ("", None),
        ("   ", None),
        ("/", None),
        ("/ draw", None),
        ("//draw", None),
        ("/usr/bin/env", None),
        ("/draw@", None),
        ("/draw@ fox", None),
        ("/draw-it", None),
        ("/draw,fox", None),
        ("/ドロー", None),
        ("a /draw", None),
        ("/" + "a" * 33, None),
        ("\\draw a fox", None),
    ],
)
def test_split_command(message: str, expected: tuple[str, str, str | None] | None) -> None:
    assert split_command(message) == expected


def test_split_then_parse() -> None:
    name, args, bot = split_command("/draw@MyBot “blade runner 2049” 7 4 --png")
    assert (name, bot) == ("draw", "MyBot")
    assert parse_draw(args, RULES) == cmd("blade runner 2049", 7, 4, as_file=True)


# ----------------------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("rules", [RULES, ODD_RULES, DrawRules(1, 50, 20, 2048, 2048, 1000, 512)], ids=["default", "odd", "big"])
def test_size_for_ratio_invariants(rules: DrawRules) -> None:
    low, high = rules.min_side, rules.max_side
    target = rules.width * rules.height if rules.max_pixels is None else min(rules.width * rules.height, rules.max_pixels)
    for across in range(1, 21):
        for down in range(1, 21):
            if max(across / down, down / across) > 4:
                continue
            width, height = size_for_ratio(across, down, rules)
            assert width % 16 == 0 and height % 16 == 0
            assert low <= width <= high and low <= height <= high
            if rules.max_pixels is not None:
                assert width * height <= rules.max_pixels
            clamped = max(width, height) == high or min(width, height) == low
            if not clamped:
                assert abs(width * height / target - 1) < 0.06, (across, down, width, height)
                assert abs((width / height) / (across / down) - 1) < 0.05, (across, down, width, height)


def test_presets_are_listed_and_distinct() -> None:
    assert list(SIZE_PRESETS) == ["square", "portrait", "landscape", "tall", "wide"]
    sizes = {size_for_ratio(*ratio, RULES) for ratio in SIZE_PRESETS.values()}
    assert len(sizes) == len(SIZE_PRESETS)


# ----------------------------------------------------------------------------------------------------------------
# Examples, property checks, import hygiene


def test_draw_examples_are_valid_commands() -> None:
    assert 2 <= len(EXAMPLES) <= 3
    for example in EXAMPLES:
        name, args, _ = split_command(example)
        assert name == "draw"
        for rules in (RULES, ODD_RULES):
            parse_draw(args, rules)


class Ticks(PlainMarkup):
    def code(self, text: str) -> str:
        return f"`{text}`"


@pytest.mark.parametrize("rules", [RULES, ODD_RULES, replace(ODD_RULES, min_steps=1, max_steps=4, default_steps=2)])
def test_every_example_the_help_shows_is_valid_under_the_configured_ranges(rules: DrawRules) -> None:
    """Help once showed `--steps 20` to a bot whose max_steps was lower: the example failed when tried."""
    text = help_text(Ticks(), min_steps=rules.min_steps, max_steps=rules.max_steps, default_steps=rules.default_steps,
                     is_test_model=False)
    shown = re.findall(r"`(/draw [^`]*)`", text)
    assert len(shown) >= 2
    for example in shown:
        _, args, _ = split_command(example)
        parse_draw(args, rules)
    assert f"Steps: {rules.min_steps}..{rules.max_steps}" in text


_JUNK_PIECES = [
    "a", "fox", " ", "  ", "\n", "\t", "\r", "\x00", "\x1b", "\x7f", "\ud83d", "\u200b", "\u202e", "🦊", "雪", "ث",
    '"', "“", "”", "„", "«", "»", "'", "’", "-", "--", "—", "=", ":", "x", "×", ".", "e", "0x", "+",
    "0", "7", "-1", "42", "4294967296", "9" * 40, "1e9", "--seed", "--steps", "--size", "--ar", "--png", "--foo",
    "seed=", "steps=", "size=", "ar=", "16:9", "768x1344", "portrait", "huge", "random", "@everyone", "<b>", "**",
    "\\", "`", "\u3164", "\ufeff",
]


def _junk(rng: random.Random) -> str:
    return "".join(rng.choice(_JUNK_PIECES) for _ in range(rng.randint(0, 14)))


def _assert_sane(result: DrawCommand, rules: DrawRules) -> None:
    assert result.prompt == result.prompt.strip()
    assert result.prompt and len(result.prompt) <= rules.max_prompt_chars
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\n\t" for ch in result.prompt)
    assert result.seed is None or 0 <= result.seed <= SEED_MAX
    assert rules.min_steps <= result.steps <= rules.max_steps
    for side in (result.width, result.height):
        assert side % 16 == 0 and rules.min_side <= side <= rules.max_side
    result.prompt.encode("utf-8")  # storable and sendable


@pytest.mark.parametrize("rules", [RULES, ODD_RULES], ids=["default", "odd"])
def test_junk_text_gives_a_command_or_a_usage_error(rules: DrawRules) -> None:
    rng = random.Random(20240604)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        text = _junk(rng)
        try:
            result = parse_draw(text, rules)
        except UsageError as exc:
            outcomes["error"] += 1
            assert exc.code in ERROR_CODES
            assert_good_message(str(exc), rules)
        else:
            outcomes["ok"] += 1
            _assert_sane(result, rules)
    assert outcomes["ok"] > 300 and outcomes["error"] > 300, outcomes  # the junk exercises both paths


def test_junk_typed_options_give_a_command_or_a_usage_error() -> None:
    rng = random.Random(7)
    seeds: list[int | str | None] = [None, -1, 0, 5, SEED_MAX, SEED_MAX + 1, -2, 10**30, "x", "", " 7 ", "1e9", "-0"]
    steps: list[int | str | None] = [None, 0, 1, 20, 50, 51, -1, 10**9, "x", "", "4"]
    sizes = [None, "square", "huge", "16:9", "0:0", "768x1344", "1x1", "", "99999x99999", "1:99999"]
    for _ in range(1500):
        try:
            result = validate_draw(_junk(rng), rng.choice(seeds), rng.choice(steps), RULES, size=rng.choice(sizes))
        except UsageError as exc:
            assert exc.code in ERROR_CODES
            assert_good_message(str(exc), RULES)
        else:
            _assert_sane(result, RULES)


def test_junk_messages_never_crash_split_command() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        message = rng.choice(["/draw", "/DRAW@Bot", "/", "/x", ""]) + _junk(rng)
        result = split_command(message)
        if result is not None:
            name, args, bot = result
            assert name == name.lower() and re.fullmatch(r"[a-z0-9_]{1,32}", name)
            assert args == args.strip()
            assert bot is None or re.fullmatch(r"[A-Za-z0-9_]+", bot)


def _fastest_parse(text: str, repeats: int = 5) -> float:
    """Seconds of the quickest of a few parses of `text`. The minimum shrugs off a busy machine; the garbage collector
    is paused because collections set off by the parser's own allocations add time that grows faster than the text."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            try:
                parse_draw(text, RULES)
            except UsageError:
                pass
            best = min(best, time.perf_counter() - started)
    finally:
        gc.enable()
    return best


@pytest.mark.parametrize(("unit", "count", "tail"), [('"a ', 20_000, ""), ("--png ", 20_000, "fox"),
                                                     ("“", 50_000, ""), ("a\x00", 50_000, "")])
@pytest.mark.timeout(60)
def test_long_inputs_stay_fast(unit: str, count: int, tail: str) -> None:
    # Telegram allows 4096 characters; pathological quoting, flags and characters on far more must parse in linear
    # time. The bound is on growth, measured here against the same input at an eighth of the length: 8x the text
    # may take at most 24x as long (a linear parser measures 8-12x, a quadratic one 64x). The absolute ceiling is
    # generous for a slow machine (0.02-0.2 s here, ten parses in all); a quadratic parser takes minutes at this
    # size, so the timeout mark ends it (the ratio is checked only once the long parse returns).
    small = _fastest_parse(unit * (count // 8) + tail)
    large = _fastest_parse(unit * count + tail)
    assert large < 24 * small, f"{large:.4f} s for 8x the text of {small:.4f} s: not linear"
    assert large < 2.0, f"{large:.2f} s for {len(unit) * count} characters"


def test_module_imports_no_torch_or_chat_library() -> None:
    code = (
        "import sys, bot.commands; "
        "bad = [m for m in ('torch', 'telegram', 'discord', 'diffsynth', 'engine.worker') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
