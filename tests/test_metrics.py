"""Metrics against hand-computed cases."""

import pytest

from single_multi.data import metrics

CHOICES = ["Paris", "London", "Berlin", "Madrid"]


@pytest.mark.parametrize("text,expected", [
    ("The answer is (B).", 1),
    ("B) London is the capital.", 1),
    ("Answer: C", 2),
    ("answer: d", 3),
    ("(A)", 0),
    ("**D**", 3),
    ("C", 2),
    ("I think it is Berlin.", 2),  # Option text, no letter.
    ("Let me think. A. is wrong because... The answer is B.", 1),  # Explicit answer wins.
    ("It could be Paris or London.", None),  # Two options named: no pick.
    ("The answer is (E).", None),  # Out of range for 4 options.
    ("I am not sure.", None),
])
def test_extract_choice(text, expected):
  assert metrics.extract_choice(text, CHOICES) == expected


def test_mc_generation_score():
  assert metrics.mc_generation_score("The answer is (B).", CHOICES, 1) == 1.0
  assert metrics.mc_generation_score("The answer is (B).", CHOICES, 0) == 0.0


def test_mc_loglik_raw_and_length_normalised():
  # Option 0: -4 over 2 tokens (-2/token); option 1: -5 over 5 tokens (-1/token).
  assert metrics.mc_loglik_predictions([-4.0, -5.0, -9.0], [2, 5, 3]) == (0, 1)
  with pytest.raises(ValueError, match="one log-prob and one length per option"):
    metrics.mc_loglik_predictions([-1.0, -2.0], [1])
  with pytest.raises(ValueError, match="must be positive"):
    metrics.mc_loglik_predictions([-1.0, -2.0], [1, 0])


def test_normalize_and_exact_match_with_aliases():
  assert metrics.normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
  assert metrics.exact_match("the Eiffel Tower.", ["Eiffel Tower", "La tour Eiffel"]) == 1.0
  assert metrics.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0


def test_token_f1_hand_computed():
  # pred {new, york, city}, gold {new, york}: P = 2/3, R = 1, F1 = 0.8.
  assert metrics.token_f1("New York City", ["New York"]) == pytest.approx(0.8)
  # Max over aliases: the second alias matches exactly.
  assert metrics.token_f1("NYC", ["New York", "nyc"]) == 1.0
  assert metrics.token_f1("Boston", ["New York"]) == 0.0
  assert metrics.token_f1("", [""]) == 1.0


@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 72.0),
    ("The total is 1,234 apples.", 1234.0),
    ("So the answer is $1,000.50 per month.", 1000.5),
    ("It takes 3.5 hours, then 2 more.", 2.0),  # Last number.
    ("The answer is -7 degrees, not 5.", -7.0),  # 'answer is' beats the last number.
    ("He walked 12km.", 12.0),  # Units.
    ("No numbers here.", None),
])
def test_extract_number(text, expected):
  assert metrics.extract_number(text) == expected


def test_numeric_match():
  assert metrics.numeric_match("so it is 1,200.", "#### 1200") == 1.0
  assert metrics.numeric_match("so it is 1,201.", 1200) == 0.0
  assert metrics.numeric_match("nothing", 3) == 0.0
