import re
import subprocess
import sys

import polars as pl
import pytest

from moce_model.data.synthetic import DOMAINS, SYNTHETIC_COLUMNS, generate_synthetic

ANSWER_LINE = re.compile(r"The answer is (.+)\.$")


@pytest.fixture(scope="module")
def train() -> pl.DataFrame:
    return generate_synthetic(200, seed=3, split="train")


@pytest.fixture(scope="module")
def heldout() -> pl.DataFrame:
    return generate_synthetic(200, seed=3, split="heldout")


def test_same_seed_same_rows_other_seed_other_rows(train):
    assert generate_synthetic(200, seed=3, split="train").equals(train)
    assert not generate_synthetic(200, seed=4, split="train").equals(train)


def test_schema_domains_and_counts(train):
    assert tuple(train.columns) == SYNTHETIC_COLUMNS
    assert all(dtype == pl.String for dtype in train.dtypes)
    counts = dict(train.group_by("domain").len().iter_rows())
    assert counts == {domain: 200 for domain in DOMAINS}
    assert train.filter(pl.col("instruction").str.strip_chars() == "").height == 0
    assert train.filter(pl.col("response").str.strip_chars() == "").height == 0
    assert train.filter(pl.col("answer") == "").height == 0


def test_prompts_are_distinct_and_varied(train):
    prompts = train.select(pl.concat_str("system", "instruction", "input", separator="|"))
    assert prompts.n_unique() == train.height
    for domain in DOMAINS:
        rows = train.filter(pl.col("domain") == domain)
        # Many templates/phrasings: the first four words of the instruction take many forms.
        openings = rows["instruction"].str.split(" ").list.head(4).list.join(" ").n_unique()
        assert openings >= 5, domain


def test_heldout_disjoint_from_train_and_uses_new_phrasings(train, heldout):
    key = pl.concat_str("system", "instruction", "input", separator="|")
    train_prompts = set(train.select(key).to_series().to_list())
    heldout_prompts = set(heldout.select(key).to_series().to_list())
    assert not train_prompts & heldout_prompts
    # Some held-out instructions follow phrasings never used in the train split.
    train_instructions = set(train["instruction"].str.replace_all(r"\d+", "N").to_list())
    unseen = [t for t in heldout["instruction"].str.replace_all(r"\d+", "N").to_list() if t not in train_instructions]
    assert len(unseen) > 0.2 * heldout.height


def test_short_enough_for_the_demo_model(train):
    # Roughly 4 characters per token: prompts plus responses mostly under about 100 tokens.
    lengths = train.select(
        pl.col("system").str.len_chars() + pl.col("instruction").str.len_chars()
        + pl.col("input").str.len_chars() + pl.col("response").str.len_chars()
    ).to_series()
    assert lengths.quantile(0.9) < 400


def _evaluate_arithmetic(response: str) -> list[tuple[str, int]]:
    results = []
    for line in response.splitlines()[:-1]:
        left, right = line.rstrip(".").split(" = ")
        expression = left.replace(" x ", " * ")
        assert re.fullmatch(r"[\d\s+\-*/]+", expression), line
        results.append((expression, int(right)))
    return results


def test_arithmetic_worked_answers_are_right(train, heldout):
    rows = pl.concat([train, heldout]).filter(pl.col("domain") == "arithmetic")
    for response, answer in rows.select("response", "answer").iter_rows():
        steps = _evaluate_arithmetic(response)
        assert steps
        for expression, value in steps:
            assert eval(expression) == value, (expression, value)  # digits and + - * / only, checked above
        assert steps[-1][1] == int(answer)
        assert ANSWER_LINE.search(response).group(1) == answer


def test_units_and_text_answers_are_right(train):
    units = train.filter(pl.col("domain") == "units")
    for response, answer in units.select("response", "answer").iter_rows():
        assert ANSWER_LINE.search(response).group(1) == answer
        computed = re.search(r"so (\d+) ([x/]) (\d+) = (\d+)\.", response)
        if computed:
            a, op, b, result = computed.groups()
            expected = int(a) * int(b) if op == "x" else int(a) // int(b)
            assert expected == int(result) == int(answer)
    text = train.filter(pl.col("domain") == "text")
    checks = {
        "Reverse the order of the words in the text.": lambda s: " ".join(reversed(s.split())),
        "Convert the text to uppercase letters.": str.upper,
        "Arrange these words alphabetically.": lambda s: " ".join(sorted(s.split())),
        "How many vowels does the text contain?": lambda s: str(sum(c in "aeiou" for c in s)),
        "Count the words in the text.": lambda s: str(len(s.split())),
    }
    checked = 0
    for instruction, text_input, answer in text.select("instruction", "input", "answer").iter_rows():
        if instruction in checks:
            assert checks[instruction](text_input) == answer, (instruction, text_input)
            checked += 1
    assert checked > 20


def test_python_reference_solutions_pass_their_tests(train, heldout):
    rows = pl.concat([train, heldout]).filter(pl.col("domain") == "python")
    assert rows.filter(pl.col("test_code") == "").height == 0
    # One subprocess for all items (each in its own namespace) keeps the test fast.
    program = "\n".join(
        f"exec({response + chr(10) + test_code!r}, {{}})" for response, test_code in rows.select("response", "test_code").iter_rows()
    )
    completed = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_python_tests_reject_a_wrong_solution(train):
    row = train.filter(pl.col("domain") == "python").row(0, named=True)
    wrong = f"def {row['answer']}(*args):\n    return None\n"
    completed = subprocess.run(
        [sys.executable, "-I", "-c", wrong + row["test_code"]], capture_output=True, text=True, timeout=30
    )
    assert completed.returncode != 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_synthetic(10, seed=0, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        generate_synthetic(10, seed=0, domains=["poetry"])
    with pytest.raises(ValueError, match="n_per_domain"):
        generate_synthetic(0, seed=0)
