"""Every string choice of the package is one `Choice` enum: its members carry what they mean, and the
arguments' help, their validation, the config schema and the docs all read them."""

import re
from pathlib import Path

import pytest

from hf_deelbo import DEELBoTrainingArguments, TPGMTrainingArguments
from hf_deelbo.core.choices import Choice
from hf_deelbo.methods.deelbo.choices import (
    ObjectiveBatchNorm,
    PosteriorCovariance,
    PriorVarianceGrouping,
    SamplingMechanism,
)
from hf_deelbo.methods.deelbo.config import DEELBO
from hf_deelbo.methods.tpgm import ProjectionNorm
from hf_deelbo.search import SelectionStrategy

DOCS = Path(__file__).resolve().parent.parent / "docs" / "trainer.md"
DEELBO_CHOICES = {
    "objective_batch_norm": ObjectiveBatchNorm,
    "sampling_mechanism": SamplingMechanism,
    "prior_variance_grouping": PriorVarianceGrouping,
    "posterior_covariance": PosteriorCovariance,
}


@pytest.mark.parametrize(
    "choice", [*DEELBO_CHOICES.values(), ProjectionNorm, SelectionStrategy], ids=lambda c: c.__name__
)
def test_members_are_their_strings_and_say_what_they_mean(choice):
    assert issubclass(choice, Choice) and choice.__doc__
    for member in choice:
        assert member == member.value and f"{member}" == member.value and str(member) == member.value
        assert member.description and member.description != member.value
    with pytest.raises(ValueError) as error:
        choice.check("arg", "nonsense")
    message = str(error.value)
    assert message.startswith("arg must be ") and message.endswith("; got 'nonsense'")
    for member in choice:
        assert f"{member.value!r} ({member.description})" in message


@pytest.mark.parametrize("name", list(DEELBO_CHOICES))
def test_arguments_take_strings_or_members_and_store_members(name, tmp_path):
    choice = DEELBO_CHOICES[name]
    for given in (choice.values()[-1], list(choice)[-1]):
        args = DEELBoTrainingArguments(output_dir=str(tmp_path), **{name: given})
        assert getattr(args, name) is list(choice)[-1]
        assert args.to_dict()[name] == choice.values()[-1] and type(args.to_dict()[name]) is str
    help_text = DEELBoTrainingArguments.__dataclass_fields__[name].metadata["help"]
    assert choice.described() in help_text


def test_config_schema_and_docs_read_the_same_choices():
    assert DEELBO.choices == {
        "prior_variance_grouping": PriorVarianceGrouping.values(),
        "posterior_covariance": PosteriorCovariance.values(),
    }
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", DOCS.read_text(), re.M)}
    for name, choice in DEELBO_CHOICES.items():
        assert all(f'`"{value}"`' in rows[name] for value in choice.values()), name


def test_tpgm_norm_is_the_enum(tmp_path):
    assert TPGMTrainingArguments(output_dir=str(tmp_path), norm="mars").norm is ProjectionNorm.MARS
