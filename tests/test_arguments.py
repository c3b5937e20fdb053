"""The checks of arguments.py, alone: no model, no TensorFlow."""
import pytest

from gpt2.arguments import ArgumentError, Controls, check_controls, check_token_ids


def test_controls_are_off_by_default_and_normalised():
    assert check_controls() == Controls(min_p=0.0, repetition_penalty=1.0, repeat_last_n=0, presence_penalty=0.0,
                                        frequency_penalty=0.0, no_repeat_ngram_size=0, logit_bias={}, bad_words=[],
                                        logprobs=None)
    controls = check_controls(min_p=0, repetition_penalty=2, presence_penalty=-2, frequency_penalty=2,
                              logit_bias={"50256": -100, 7: 100}, bad_words="never", logprobs=20)
    assert controls == (0.0, 2.0, 0, -2.0, 2.0, 0, {50256: -100.0, 7: 100.0}, ["never"], 20)
    assert [type(value) for value in controls[:6]] == [float, float, int, float, float, int]
    assert list(controls.logit_bias) == [50256, 7] and all(type(b) is float for b in controls.logit_bias.values())
    assert check_controls(**controls._asdict()) == controls  # the API checks again what the commands pass on


@pytest.mark.parametrize("controls,message", [
    ({"min_p": 1}, "{min_p} must be a number in [0, 1) (0 turns it off), not 1"),
    ({"min_p": -0.1}, "{min_p} must be a number in [0, 1)"),
    ({"min_p": "0.1"}, "{min_p} must be a number in [0, 1)"),
    ({"repetition_penalty": 0}, "{repetition_penalty} must be a number > 0 (1 turns it off), not 0"),
    ({"repetition_penalty": -1.2}, "{repetition_penalty} must be a number > 0"),
    ({"repetition_penalty": float("inf")}, "{repetition_penalty} must be a number > 0"),
    ({"repetition_penalty": float("nan")}, "{repetition_penalty} must be a number > 0"),
    ({"repeat_last_n": -1}, "{repeat_last_n} must be a whole number >= 0 (0: the whole text), not -1"),
    ({"repeat_last_n": 2.0}, "{repeat_last_n} must be a whole number >= 0"),
    ({"presence_penalty": 2.5}, "{presence_penalty} must be a number from -2 to 2 (0 turns it off), not 2.5"),
    ({"frequency_penalty": -2.01}, "{frequency_penalty} must be a number from -2 to 2"),
    ({"frequency_penalty": True}, "{frequency_penalty} must be a number from -2 to 2"),
    ({"no_repeat_ngram_size": -3}, "{no_repeat_ngram_size} must be a whole number >= 0 (0 turns it off), not -3"),
    ({"no_repeat_ngram_size": 1.5}, "{no_repeat_ngram_size} must be a whole number >= 0"),
    ({"logit_bias": [50256, -100]}, "{logit_bias} must be a dict of token ids to biases, such as {50256: -100}"),
    ({"logit_bias": {-1: 5}}, "token ids in {logit_bias} must be whole numbers >= 0, not -1"),
    ({"logit_bias": {1.5: 5}}, "token ids in {logit_bias} must be whole numbers >= 0, not 1.5"),
    ({"logit_bias": {"a": 5}}, "token ids in {logit_bias} must be whole numbers >= 0, not 'a'"),
    ({"logit_bias": {"-1": 5}}, "token ids in {logit_bias} must be whole numbers >= 0, not '-1'"),
    ({"logit_bias": {5: 100.5}}, "biases in {logit_bias} must be numbers from -100 to 100, not 100.5 (token 5)"),
    ({"logit_bias": {5: -101}}, "biases in {logit_bias} must be numbers from -100 to 100, not -101"),
    ({"logit_bias": {5: "1"}}, "biases in {logit_bias} must be numbers from -100 to 100, not '1'"),
    ({"logit_bias": {5: 1, "5": 2}}, "{logit_bias} names token 5 twice: give it one bias"),
    ({"bad_words": ""}, "{bad_words} must be text never generated, never an empty string, not ['']"),
    ({"bad_words": ["a", ""]}, "{bad_words} must be text never generated, never an empty string"),
    ({"bad_words": ["a", 3]}, "{bad_words} must be a string or a list of strings"),
    ({"logprobs": 21}, "{logprobs} must be a whole number from 0 to 20"),
    ({"logprobs": -1}, "{logprobs} must be a whole number from 0 to 20"),
    ({"logprobs": 2.5}, "{logprobs} must be a whole number from 0 to 20"),
])
def test_impossible_controls_are_named(controls, message):
    """One line, naming the parameter: `logit_bias` from Python, `--logit_bias` in the commands."""
    [name] = controls
    with pytest.raises(ArgumentError) as error:
        check_controls(**controls)
    assert error.value.names == (name,)
    assert error.value.template.startswith(message) and "\n" not in error.value.template


def test_token_ids_are_checked_against_the_vocabulary():
    assert check_token_ids({0: 1.0, 656: -100.0}, 657) == {0: 1.0, 656: -100.0}
    with pytest.raises(ArgumentError) as error:
        check_token_ids({3: 1.0, 657: -100.0}, 657)
    assert error.value.worded("--") == "--logit_bias names token 657, but the model has 657 tokens, 0 to 656"
