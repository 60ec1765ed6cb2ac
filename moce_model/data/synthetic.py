"""The offline demo instruction mix: four clearly different domains with verifiable answers.

Domains
-------
``arithmetic``  word problems with a short worked answer.
``python``      small functions: the instruction describes one, the response is the code, ``test_code`` checks it.
``text``        text transformations (reverse words, uppercase, count vowels, sort words, ...).
``units``       unit conversions with computed answers, plus simple numeric facts.

Every non-python response ends with the line ``The answer is <answer>.``; ``answer`` holds the canonical
string to compare a generated completion with (for python it is the function name; ``test_code`` decides).

Train / held-out split
----------------------
Each template has several phrasings; the last phrasing of every template (and one system prompt) is
reserved for the held-out split. In addition every prompt text falls into a content bucket by hash, and one
bucket in five belongs to the held-out split only. Train items use train phrasings *and* train buckets;
held-out items use a held-out phrasing or a held-out bucket. The two splits are therefore disjoint by
construction, whatever the seeds, and the held-out split measures generalisation to new phrasings and new
numbers, not memorisation.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl

Split = Literal["train", "heldout"]
DOMAINS: tuple[str, ...] = ("arithmetic", "python", "text", "units")
SYNTHETIC_COLUMNS: tuple[str, ...] = (
    "system",
    "instruction",
    "input",
    "response",
    "domain",
    "answer",
    "test_code",
)

_HELDOUT_BUCKETS = 5  # one content bucket in five is held-out only

_SYSTEM_PROMPTS_TRAIN = ["", "", "", "", "You are a helpful assistant.", "Answer the request accurately."]
_SYSTEM_PROMPT_HELDOUT = "You are a concise and careful assistant."


@dataclass(frozen=True)
class _Item:
    instruction: str
    input: str
    response: str
    answer: str
    test_code: str
    heldout_phrasing: bool


class _Picker:
    """Chooses phrasings for one split and remembers whether a held-out-only phrasing was used."""

    def __init__(self, rng: random.Random, split: Split) -> None:
        self.rng = rng
        self.split = split
        self.used_heldout = False

    def phrasing(self, options: Sequence[str]) -> str:
        if len(options) < 2:
            return options[0]
        if self.split == "train":
            return self.rng.choice(options[:-1])
        if self.rng.random() < 0.5:
            self.used_heldout = True
            return options[-1]
        return self.rng.choice(options[:-1])


def _answer_line(answer: str | int) -> str:
    return f"The answer is {answer}."


# ----------------------------------------------------------------------------------------------- arithmetic

_NAMES = [
    "Ava", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jonas", "Kira", "Liam",
    "Maya", "Noah", "Olivia", "Pedro", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe",
]
_THINGS = [
    "apples", "pencils", "marbles", "stickers", "cookies", "books", "oranges", "cards", "toy cars", "candies",
    "shells", "balloons", "muffins", "stamps", "eggs", "buttons", "crayons", "cupcakes", "flowers", "coins",
]


def _arith_buy(rng: random.Random, pick: _Picker) -> _Item:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    count, price = rng.randint(2, 12), rng.randint(2, 15)
    total = count * price
    text = pick.phrasing([
        f"{name} buys {count} {thing} that cost ${price} each. How much does {name} spend in total?",
        f"Each of the {thing} costs ${price}. {name} buys {count} of them. How many dollars does {name} pay?",
        f"{name} wants {count} {thing}. One costs ${price}. What is the total cost in dollars?",
        f"If {count} {thing} are bought at ${price} apiece by {name}, what does {name} pay altogether?",
    ])
    return _Item(text, "", f"{count} x {price} = {total}.\n{_answer_line(total)}", str(total), "", False)


def _arith_give_away(rng: random.Random, pick: _Picker) -> _Item:
    name, friend = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    have = rng.randint(10, 60)
    give = rng.randint(1, have - 1)
    left = have - give
    text = pick.phrasing([
        f"{name} has {have} {thing} and gives {give} of them to {friend}. How many {thing} does {name} have left?",
        f"There are {have} {thing} in {name}'s bag. {name} gives {friend} {give}. How many remain?",
        f"{name} had {have} {thing}. After giving {give} to {friend}, how many {thing} are left?",
        f"Starting with {have} {thing}, {name} hands {give} to {friend}. How many {thing} does {name} keep?",
    ])
    return _Item(text, "", f"{have} - {give} = {left}.\n{_answer_line(left)}", str(left), "", False)


def _arith_collect(rng: random.Random, pick: _Picker) -> _Item:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    first, second = rng.randint(3, 50), rng.randint(3, 50)
    total = first + second
    text = pick.phrasing([
        f"{name} collected {first} {thing} on Monday and {second} {thing} on Tuesday. How many {thing} did {name} collect?",
        f"In the morning {name} found {first} {thing}, and in the afternoon {second} more. How many in all?",
        f"{name} has {first} {thing} and gets {second} more as a gift. How many {thing} does {name} have now?",
        f"A jar holds {first} {thing}. {name} adds {second} {thing}. How many {thing} are in the jar?",
    ])
    return _Item(text, "", f"{first} + {second} = {total}.\n{_answer_line(total)}", str(total), "", False)


def _arith_share(rng: random.Random, pick: _Picker) -> _Item:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    each, people = rng.randint(2, 12), rng.randint(2, 9)
    total = each * people
    text = pick.phrasing([
        f"{name} shares {total} {thing} equally among {people} friends. How many {thing} does each friend get?",
        f"{total} {thing} are split evenly into {people} groups by {name}. How many {thing} are in each group?",
        f"{name} puts {total} {thing} into {people} boxes with the same number in each box. How many per box?",
        f"If {name} divides {total} {thing} fairly between {people} children, how many does each child receive?",
    ])
    return _Item(text, "", f"{total} / {people} = {each}.\n{_answer_line(each)}", str(each), "", False)


def _arith_boxes(rng: random.Random, pick: _Picker) -> _Item:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    boxes, per_box, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    product = boxes * per_box
    total = product + extra
    text = pick.phrasing([
        f"{name} has {boxes} boxes with {per_box} {thing} in each box and {extra} loose {thing}. How many {thing} does {name} have?",
        f"There are {boxes} bags of {per_box} {thing} each, plus {extra} extra {thing}. How many {thing} are there in total?",
        f"{name} buys {boxes} packs of {per_box} {thing} and already owns {extra}. How many {thing} does {name} own now?",
        f"A shelf has {boxes} rows of {per_box} {thing}, and {extra} more {thing} lie on top. Count all the {thing}.",
    ])
    response = f"{boxes} x {per_box} = {product}.\n{product} + {extra} = {total}.\n{_answer_line(total)}"
    return _Item(text, "", response, str(total), "", False)


def _arith_age(rng: random.Random, pick: _Picker) -> _Item:
    name, other = rng.sample(_NAMES, 2)
    age, gap, years = rng.randint(5, 40), rng.randint(1, 30), rng.randint(1, 15)
    other_now = age + gap
    later = other_now + years
    text = pick.phrasing([
        f"{name} is {age} years old. {other} is {gap} years older than {name}. How old will {other} be in {years} years?",
        f"{other} is {gap} years older than {name}, who is {age}. What age will {other} be {years} years from now?",
        f"{name}'s age is {age}. {other} is {gap} years older. In {years} years, how old is {other}?",
        f"Today {name} turns {age}, and {other} is {gap} years older. How old is {other} after {years} more years?",
    ])
    response = f"{age} + {gap} = {other_now}.\n{other_now} + {years} = {later}.\n{_answer_line(later)}"
    return _Item(text, "", response, str(later), "", False)


def _arith_savings(rng: random.Random, pick: _Picker) -> _Item:
    name = rng.choice(_NAMES)
    start, weekly, weeks = rng.randint(0, 50), rng.randint(2, 20), rng.randint(2, 10)
    saved = weekly * weeks
    total = start + saved
    text = pick.phrasing([
        f"{name} has ${start} and saves ${weekly} every week. How much money does {name} have after {weeks} weeks?",
        f"Starting with ${start}, {name} puts away ${weekly} each week for {weeks} weeks. How many dollars does {name} have?",
        f"{name} saves ${weekly} a week for {weeks} weeks and already had ${start}. What is the total in dollars?",
        f"After {weeks} weeks of saving ${weekly} per week, plus the ${start} {name} started with, how much does {name} have?",
    ])
    response = f"{weekly} x {weeks} = {saved}.\n{start} + {saved} = {total}.\n{_answer_line(total)}"
    return _Item(text, "", response, str(total), "", False)


def _arith_instructed(rng: random.Random, pick: _Picker) -> _Item:
    """A word problem placed in ``input`` with a generic instruction, as many real datasets do."""
    inner = rng.choice([_arith_buy, _arith_give_away, _arith_collect, _arith_share, _arith_boxes])
    problem = inner(rng, pick)
    instruction = pick.phrasing([
        "Solve the following math word problem.",
        "Work out the answer to this word problem step by step.",
        "Answer the arithmetic question below.",
        "Read the word problem and compute the result.",
    ])
    return _Item(instruction, problem.instruction, problem.response, problem.answer, "", False)


_ARITHMETIC = [
    _arith_buy, _arith_give_away, _arith_collect, _arith_share, _arith_boxes, _arith_age, _arith_savings,
    _arith_instructed,
]

# --------------------------------------------------------------------------------------------------- python


@dataclass(frozen=True)
class _PyFunc:
    names: tuple[str, ...]
    arg: str
    description: str  # a verb phrase in the third person: "returns ..."
    body: str  # the function body, indented, referring to ``arg``
    reference: Callable[..., object]
    cases: tuple[tuple[object, ...], ...]


def _py_families(k: int) -> list[_PyFunc]:
    """Function families; ``k`` parameterises the ones whose behaviour depends on a constant."""
    return [
        _PyFunc((f"add_{k}", f"plus_{k}"), "numbers", f"returns a new list with {k} added to each number",
                f"    return [x + {k} for x in numbers]", lambda xs: [x + k for x in xs],
                (([1, 2, 3],), ([],), ([-5, 10],))),
        _PyFunc((f"times_{k}", f"multiply_by_{k}"), "numbers", f"returns a new list with each number multiplied by {k}",
                f"    return [x * {k} for x in numbers]", lambda xs: [x * k for x in xs],
                (([1, 2, 3],), ([],), ([0, -4],))),
        _PyFunc((f"is_multiple_of_{k}", f"divisible_by_{k}"), "n", f"returns True if n is divisible by {k} and False otherwise",
                f"    return n % {k} == 0", lambda n: n % k == 0, ((k * 3,), (k * 3 + 1,), (0,), (7,))),
        _PyFunc((f"count_above_{k}", f"count_greater_than_{k}"), "numbers", f"returns how many numbers in the list are greater than {k}",
                f"    return sum(1 for x in numbers if x > {k})", lambda xs: sum(1 for x in xs if x > k),
                (([k - 1, k, k + 1, k + 5],), ([],), ([100, -100],))),
        _PyFunc((f"repeat_{k}", f"repeat_text_{k}_times"), "text", f"returns the text repeated {k} times",
                f"    return text * {k}", lambda s: s * k, (("ab",), ("",), ("x",))),
        _PyFunc((f"power_{k}", f"raise_to_{k}"), "x", f"returns x raised to the power {k}",
                f"    return x ** {k}", lambda x: x**k, ((2,), (3,), (0,), (1,))),
        _PyFunc((f"first_{k}", f"take_{k}"), "items", f"returns a list of the first {k} items of the given list",
                f"    return items[:{k}]", lambda xs: xs[:k], ((list(range(20)),), ([],), ([7],))),
        _PyFunc((f"below_{k}", f"keep_below_{k}"), "numbers", f"returns a list of only the numbers that are smaller than {k}",
                f"    return [x for x in numbers if x < {k}]", lambda xs: [x for x in xs if x < k],
                (([k - 2, k, k + 3, -1],), ([],))),
        _PyFunc((f"cap_at_{k}", f"clamp_to_{k}"), "x", f"returns x, but never a value larger than {k}",
                f"    return min(x, {k})", lambda x: min(x, k), ((k + 10,), (k - 1,), (k,))),
        _PyFunc((f"last_{k}_chars", f"tail_{k}"), "text", f"returns the last {k} characters of the text",
                f"    return text[-{k}:]", lambda s: s[-k:], (("abcdefghijklmnopqrstuvwxyz",), ("hi",))),
    ]


_PY_FIXED = [
    _PyFunc(("reverse_string", "reverse_text", "backwards"), "text", "returns the text with its characters in reverse order",
            "    return text[::-1]", lambda s: s[::-1], (("hello",), ("",), ("ab c",))),
    _PyFunc(("is_palindrome", "reads_same_backwards"), "text", "returns True if the text reads the same forwards and backwards",
            "    return text == text[::-1]", lambda s: s == s[::-1], (("level",), ("python",), ("",))),
    _PyFunc(("count_vowels", "vowel_count"), "text", "returns the number of vowels (a, e, i, o, u) in the text, ignoring case",
            '    return sum(1 for c in text.lower() if c in "aeiou")', lambda s: sum(1 for c in s.lower() if c in "aeiou"),
            (("Hello World",), ("xyz",), ("AEIOU",))),
    _PyFunc(("factorial", "fact"), "n", "returns the factorial of a non-negative integer n",
            "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
            lambda n: __import__("math").factorial(n), ((0,), (1,), (5,), (7,))),
    _PyFunc(("fibonacci", "fib"), "n", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1",
            "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
            lambda n: [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55][n], ((0,), (1,), (2,), (10,))),
    _PyFunc(("sum_digits", "digit_sum"), "n", "returns the sum of the decimal digits of a non-negative integer n",
            "    return sum(int(d) for d in str(n))", lambda n: sum(int(d) for d in str(n)), ((0,), (123,), (9999,))),
    _PyFunc(("largest", "max_value"), "numbers", "returns the largest number in a non-empty list",
            "    return max(numbers)", max, (([3, 9, 2],), ([-5, -1],), ([4],))),
    _PyFunc(("is_even", "even"), "n", "returns True if the integer n is even and False otherwise",
            "    return n % 2 == 0", lambda n: n % 2 == 0, ((4,), (7,), (0,), (-3,))),
    _PyFunc(("squares", "square_all"), "numbers", "returns a new list with the square of each number",
            "    return [x * x for x in numbers]", lambda xs: [x * x for x in xs], (([1, 2, 3],), ([],), ([-4],))),
    _PyFunc(("average", "mean"), "numbers", "returns the average of a non-empty list of numbers",
            "    return sum(numbers) / len(numbers)", lambda xs: sum(xs) / len(xs), (([1, 2, 3],), ([10],), ([2, 4],))),
    _PyFunc(("count_words", "word_count"), "text", "returns the number of words in the text, split on whitespace",
            "    return len(text.split())", lambda s: len(s.split()), (("one two three",), ("",), ("  a  b ",))),
    _PyFunc(("unique_sorted", "sorted_unique"), "items", "returns the distinct items of the list in ascending order",
            "    return sorted(set(items))", lambda xs: sorted(set(xs)), (([3, 1, 3, 2],), ([],), ([5, 5],))),
    _PyFunc(("capitalize_words", "title_words"), "text", "returns the text with the first letter of every word in uppercase",
            '    return " ".join(w.capitalize() for w in text.split())',
            lambda s: " ".join(w.capitalize() for w in s.split()), (("hello big world",), ("a",))),
    _PyFunc(("sum_evens", "even_sum"), "numbers", "returns the sum of the even numbers in the list",
            "    return sum(x for x in numbers if x % 2 == 0)", lambda xs: sum(x for x in xs if x % 2 == 0),
            (([1, 2, 3, 4],), ([],), ([7, 9],))),
]


def _python_item(rng: random.Random, pick: _Picker) -> _Item:
    if rng.random() < 0.6:
        func = rng.choice(_py_families(rng.randint(2, 19)))
    else:
        func = rng.choice(_PY_FIXED)
    name = rng.choice(func.names)
    signature = f"{name}({func.arg})"
    code = f"def {signature}:\n{func.body}"
    tests = "\n".join(f"assert {name}({', '.join(map(repr, case))}) == {func.reference(*case)!r}" for case in func.cases)
    style = rng.random()
    if style < 0.75:
        instruction = pick.phrasing([
            f"Write a Python function `{signature}` that {func.description}.",
            f"Implement the Python function {signature}. It {func.description}.",
            f"Create a Python function called {name} that takes {func.arg} and {func.description}.",
            f"In Python, write def {signature}: the function {func.description}.",
            f"Define a Python function named {name} which {func.description}.",
        ])
        return _Item(instruction, "", code, name, tests, False)
    instruction = pick.phrasing([
        "Write the Python function described below.",
        "Implement this specification as a Python function.",
        "Complete the Python code for the following function specification.",
    ])
    spec = f"Name: {name}\nArgument: {func.arg}\nBehaviour: {func.description}"
    return _Item(instruction, spec, code, name, tests, False)


_PYTHON = [_python_item]

# ----------------------------------------------------------------------------------------------------- text

_WORDS = [
    "red", "blue", "green", "yellow", "purple", "silver", "orange", "black", "white", "golden",
    "cat", "dog", "horse", "rabbit", "tiger", "parrot", "turtle", "whale", "fox", "owl",
    "river", "mountain", "forest", "garden", "window", "table", "candle", "bridge", "castle", "island",
    "quiet", "bright", "gentle", "rapid", "little", "happy", "ancient", "frozen", "lucky", "sleepy",
    "piano", "rocket", "lantern", "pillow", "basket", "mirror", "violin", "ladder", "anchor", "meadow",
]


def _words(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return rng.sample(_WORDS, rng.randint(low, high))


def _text_reverse_words(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng)
    answer = " ".join(reversed(words))
    instruction = pick.phrasing([
        "Reverse the order of the words in the text.",
        "Write the words of this text in reverse order.",
        "Rewrite the text so that the last word comes first and the first word comes last.",
        "Put the words below in backwards order.",
    ])
    return _Item(instruction, " ".join(words), _answer_line(answer), answer, "", False)


def _text_uppercase(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng)
    answer = " ".join(words).upper()
    instruction = pick.phrasing([
        "Convert the text to uppercase letters.",
        "Rewrite the text in all capital letters.",
        "Change every letter of the text to upper case.",
        "Make the following text fully uppercase.",
    ])
    return _Item(instruction, " ".join(words), _answer_line(answer), answer, "", False)


def _text_lowercase(rng: random.Random, pick: _Picker) -> _Item:
    words = [w.upper() if rng.random() < 0.5 else w.capitalize() for w in _words(rng)]
    answer = " ".join(words).lower()
    instruction = pick.phrasing([
        "Convert the text to lowercase letters.",
        "Rewrite the text using only small letters.",
        "Change every letter of the text to lower case.",
        "Make the following text fully lowercase.",
    ])
    return _Item(instruction, " ".join(words), _answer_line(answer), answer, "", False)


def _text_count_vowels(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng, 2, 4)
    text = " ".join(words)
    vowels = [c for c in text if c in "aeiou"]
    instruction = pick.phrasing([
        "Count the vowels (a, e, i, o, u) in the text.",
        "How many vowels does the text contain?",
        "Find the number of vowel letters in the text.",
        "Tell me how many of the letters in this text are vowels.",
    ])
    response = f"The vowels are {', '.join(vowels)}.\n{_answer_line(len(vowels))}"
    return _Item(instruction, text, response, str(len(vowels)), "", False)


def _text_count_words(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng, 3, 9) if rng.random() < 0.5 else rng.choices(_WORDS, k=rng.randint(3, 9))
    instruction = pick.phrasing([
        "Count the words in the text.",
        "How many words are in the text?",
        "Give the number of words in this text.",
        "Tell me the word count of the following text.",
    ])
    return _Item(instruction, " ".join(words), _answer_line(len(words)), str(len(words)), "", False)


def _text_sort_words(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng)
    answer = " ".join(sorted(words))
    instruction = pick.phrasing([
        "Sort the words of the text in alphabetical order.",
        "Arrange these words alphabetically.",
        "List the words of the text from A to Z.",
        "Put the words below into dictionary order.",
    ])
    return _Item(instruction, " ".join(words), _answer_line(answer), answer, "", False)


def _text_initials(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng)
    answer = "".join(w[0] for w in words)
    instruction = pick.phrasing([
        "Write the first letter of each word in the text, joined together.",
        "Form a string from the first letter of every word.",
        "Take the initial letter of each word and join them.",
        "Build an acronym in lowercase from the words below.",
    ])
    return _Item(instruction, " ".join(words), _answer_line(answer), answer, "", False)


def _text_longest_word(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng)
    longest = max(len(w) for w in words)
    if sum(len(w) == longest for w in words) > 1:  # keep the answer unambiguous
        words = [w for w in words if len(w) != longest] + [next(w for w in words if len(w) == longest)]
        rng.shuffle(words)
    answer = max(words, key=len)
    instruction = pick.phrasing([
        "Find the longest word in the text.",
        "Which word in the text has the most letters?",
        "Return the longest word of the following text.",
        "Pick out the word with the greatest number of letters.",
    ])
    return _Item(instruction, " ".join(words), _answer_line(answer), answer, "", False)


def _text_reverse_letters(rng: random.Random, pick: _Picker) -> _Item:
    word = rng.choice(_WORDS)
    answer = word[::-1]
    instruction = pick.phrasing([
        f"Spell the word '{word}' backwards.",
        f"Write the letters of '{word}' in reverse order.",
        f"Reverse the characters of the word '{word}'.",
        f"What is '{word}' written from right to left?",
    ])
    return _Item(instruction, "", _answer_line(answer), answer, "", False)


def _text_count_letter(rng: random.Random, pick: _Picker) -> _Item:
    words = _words(rng, 3, 5)
    text = " ".join(words)
    letter = rng.choice(sorted(set(text.replace(" ", ""))))
    count = text.count(letter)
    instruction = pick.phrasing([
        f"How many times does the letter '{letter}' appear in the text?",
        f"Count the occurrences of the letter '{letter}' in the text.",
        f"Find how often '{letter}' occurs in this text.",
        f"Tell me the number of '{letter}' characters in the text below.",
    ])
    return _Item(instruction, text, _answer_line(count), str(count), "", False)


_TEXT = [
    _text_reverse_words, _text_uppercase, _text_lowercase, _text_count_vowels, _text_count_words, _text_sort_words,
    _text_initials, _text_longest_word, _text_reverse_letters, _text_count_letter,
]

# ---------------------------------------------------------------------------------------------------- units

# (big unit plural, big singular, small unit plural, small singular, factor)
_CONVERSIONS = [
    ("kilometers", "kilometer", "meters", "meter", 1000),
    ("meters", "meter", "centimeters", "centimeter", 100),
    ("centimeters", "centimeter", "millimeters", "millimeter", 10),
    ("kilograms", "kilogram", "grams", "gram", 1000),
    ("liters", "liter", "milliliters", "milliliter", 1000),
    ("hours", "hour", "minutes", "minute", 60),
    ("minutes", "minute", "seconds", "second", 60),
    ("days", "day", "hours", "hour", 24),
    ("weeks", "week", "days", "day", 7),
    ("years", "year", "months", "month", 12),
    ("dollars", "dollar", "cents", "cent", 100),
    ("feet", "foot", "inches", "inch", 12),
    ("kilobytes", "kilobyte", "bytes", "byte", 1024),
]

_FACTS = [
    ("How many legs does a spider have?", "A spider has 8 legs.", 8),
    ("How many legs does an insect have?", "An insect has 6 legs.", 6),
    ("How many sides does a triangle have?", "A triangle has 3 sides.", 3),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides.", 6),
    ("How many sides does an octagon have?", "An octagon has 8 sides.", 8),
    ("How many sides does a pentagon have?", "A pentagon has 5 sides.", 5),
    ("How many days are there in a leap year?", "A leap year has 366 days.", 366),
    ("How many days are there in a common year?", "A common year has 365 days.", 365),
    ("How many continents are there on Earth?", "There are 7 continents.", 7),
    ("How many planets are in the Solar System?", "The Solar System has 8 planets.", 8),
    ("At how many degrees Celsius does water boil at sea level?", "Water boils at 100 degrees Celsius.", 100),
    ("At how many degrees Celsius does water freeze?", "Water freezes at 0 degrees Celsius.", 0),
    ("How many players does a soccer team have on the field?", "A soccer team has 11 players on the field.", 11),
    ("How many keys does a standard piano have?", "A standard piano has 88 keys.", 88),
    ("How many strings does a violin have?", "A violin has 4 strings.", 4),
    ("How many hours are there in a day?", "A day has 24 hours.", 24),
    ("How many days are there in a week?", "A week has 7 days.", 7),
    ("How many months are there in a year?", "A year has 12 months.", 12),
    ("How many minutes are there in an hour?", "An hour has 60 minutes.", 60),
    ("How many seconds are there in a minute?", "A minute has 60 seconds.", 60),
    ("How many centimeters are there in a meter?", "A meter has 100 centimeters.", 100),
    ("How many grams are there in a kilogram?", "A kilogram has 1000 grams.", 1000),
    ("How many items are there in a dozen?", "A dozen is 12 items.", 12),
    ("How many years are there in a century?", "A century has 100 years.", 100),
    ("How many years are there in a decade?", "A decade has 10 years.", 10),
]


def _units_big_to_small(rng: random.Random, pick: _Picker) -> _Item:
    big, big_one, small, _small_one, factor = rng.choice(_CONVERSIONS)
    value = rng.randint(2, 60)
    result = value * factor
    instruction = pick.phrasing([
        f"Convert {value} {big} to {small}.",
        f"How many {small} are in {value} {big}?",
        f"Express {value} {big} in {small}.",
        f"{value} {big} equals how many {small}?",
        f"What is {value} {big} when written in {small}?",
    ])
    response = f"1 {big_one} = {factor} {small}, so {value} x {factor} = {result}.\n{_answer_line(result)}"
    return _Item(instruction, "", response, str(result), "", False)


def _units_small_to_big(rng: random.Random, pick: _Picker) -> _Item:
    big, big_one, small, _small_one, factor = rng.choice(_CONVERSIONS)
    result = rng.randint(2, 30)
    value = result * factor
    instruction = pick.phrasing([
        f"Convert {value} {small} to {big}.",
        f"How many {big} are in {value} {small}?",
        f"Express {value} {small} in {big}.",
        f"{value} {small} equals how many {big}?",
        f"What is {value} {small} when written in {big}?",
    ])
    response = f"1 {big_one} = {factor} {small}, so {value} / {factor} = {result}.\n{_answer_line(result)}"
    return _Item(instruction, "", response, str(result), "", False)


def _units_instructed(rng: random.Random, pick: _Picker) -> _Item:
    big, big_one, small, _small_one, factor = rng.choice(_CONVERSIONS)
    value = rng.randint(2, 60)
    result = value * factor
    instruction = pick.phrasing([
        f"Convert the quantity to {small}.",
        f"Give this measurement in {small}.",
        f"Change the unit of the quantity to {small}.",
        f"Rewrite the amount using {small} as the unit.",
    ])
    response = f"1 {big_one} = {factor} {small}, so {value} x {factor} = {result}.\n{_answer_line(result)}"
    return _Item(instruction, f"{value} {big}", response, str(result), "", False)


def _units_fact(rng: random.Random, pick: _Picker) -> _Item:
    question, statement, answer = rng.choice(_FACTS)
    prefix = pick.phrasing(["", "Quick fact check: ", "Answer with a number: ", "Fact question: ", "Numeric trivia: "])
    return _Item(prefix + question, "", f"{statement}\n{_answer_line(answer)}", str(answer), "", False)


def _units_item(rng: random.Random, pick: _Picker) -> _Item:
    # Facts are a small pool: drawn rarely so they do not repeat too often.
    roll = rng.random()
    if roll < 0.1:
        return _units_fact(rng, pick)
    if roll < 0.25:
        return _units_instructed(rng, pick)
    if roll < 0.65:
        return _units_big_to_small(rng, pick)
    return _units_small_to_big(rng, pick)


_UNITS = [_units_item]

_GENERATORS: dict[str, list[Callable[[random.Random, _Picker], _Item]]] = {
    "arithmetic": _ARITHMETIC,
    "python": _PYTHON,
    "text": _TEXT,
    "units": _UNITS,
}

# ------------------------------------------------------------------------------------------------ generation


def _is_heldout_bucket(prompt: str) -> bool:
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _HELDOUT_BUCKETS == 0


def _system_prompt(rng: random.Random, picker: _Picker) -> str:
    if picker.split == "heldout" and rng.random() < 0.2:
        picker.used_heldout = True
        return _SYSTEM_PROMPT_HELDOUT
    return rng.choice(_SYSTEM_PROMPTS_TRAIN)


def _generate_domain(domain: str, n: int, seed: int, split: Split) -> list[dict[str, str]]:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and platforms.
    rng = random.Random(f"moce-synthetic/{seed}/{split}/{domain}")
    generators = _GENERATORS[domain]
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    max_attempts = 200 * n + 1000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"synthetic domain {domain!r}: could only make {len(rows)} distinct {split} items of the "
                f"{n} asked for; ask for fewer items per domain"
            )
        picker = _Picker(rng, split)
        item = rng.choice(generators)(rng, picker)
        system = _system_prompt(rng, picker)
        prompt = f"{item.instruction}\n{item.input}"
        heldout_bucket = _is_heldout_bucket(prompt)
        if split == "train" and heldout_bucket:
            continue
        if split == "heldout" and not (heldout_bucket or picker.used_heldout):
            continue
        key = f"{system}\n{prompt}"
        if key in seen:
            continue
        seen.add(key)
        rows.append({
            "system": system,
            "instruction": item.instruction,
            "input": item.input,
            "response": item.response,
            "domain": domain,
            "answer": item.answer,
            "test_code": item.test_code,
        })
    return rows


def generate_synthetic(
    n_per_domain: int,
    seed: int = 0,
    split: Split = "train",
    domains: Sequence[str] = DOMAINS,
) -> pl.DataFrame:
    """Deterministic demo mix: ``n_per_domain`` rows per domain with the columns of ``SYNTHETIC_COLUMNS``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n_per_domain < 1:
        raise ValueError(f"n_per_domain must be >= 1, got {n_per_domain}")
    unknown = [d for d in domains if d not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown synthetic domain(s) {unknown}; known: {list(_GENERATORS)}")
    rows: list[dict[str, str]] = []
    for domain in domains:
        rows.extend(_generate_domain(domain, n_per_domain, seed, split))
    return pl.DataFrame(rows, schema={c: pl.String for c in SYNTHETIC_COLUMNS})
