"""The typed, versioned config entries (`hub.config.MethodConfig`): JSON names, round trips, the
one reader on local directories and the Hub, unknown keys warned once, newer versions refused."""

import json
import logging
import os
import stat

import pytest
from huggingface_hub import HfApi

from hf_deelbo import load_deelbo_config
from hf_deelbo.hub.config import ADAPTER_CONFIG_ENTRIES_NAME
from hf_deelbo.methods.deelbo.config import DEELBO, DEELBoConfig
from hf_deelbo.methods.l2sp import L2SPConfig
from hf_deelbo.methods.tpgm import TPGMConfig
from hf_deelbo.registry import entry_field, entry_schema, registered_methods

LEARNED = dict(
    backbone_prior_variance=2e-3,
    head_prior_variance=0.5,
    sigma=0.04,
    kappa=1250.0,
    num_train_examples=40,
    num_backbone_params=48_000,
    num_head_params=2_000,
    head_modules=["classifier"],
)
# The same entry written out by hand: JSON names, α_eff = 1/(Dλ), β_eff = 1/(Dτ), the format version.
EXPECTED = {
    "alpha_eff": 1 / (50_000 * 2e-3),
    "beta_eff": 1 / (50_000 * 0.5),
    "format_version": 1,
    "head_modules": ["classifier"],
    "kappa": 1250.0,
    "lambda": 2e-3,
    "num_backbone_params": 48_000,
    "num_head_params": 2_000,
    "num_train_examples": 40,
    "posterior_covariance": "isotropic",
    "prior_variance_grouping": "backbone",
    "sigma": 0.04,
    "tau": 0.5,
}


def test_the_entry_is_its_json_names_and_round_trips():
    config = DEELBoConfig.from_learned(**LEARNED)
    entry = config.to_dict()
    assert entry.keys() == EXPECTED.keys() and list(entry) == sorted(entry)
    for name, value in EXPECTED.items():
        assert entry[name] == pytest.approx(value) if isinstance(value, float) else entry[name] == value, name
    assert DEELBoConfig.from_dict(json.loads(json.dumps(entry))) == config
    assert config.num_params == 50_000


def test_every_registered_method_has_a_typed_entry_whose_fields_are_its_schema():
    for spec in registered_methods():
        assert spec.config_class is not None and spec.config_class.method is spec, spec.key
        schema, choices = entry_schema(spec.config_class)
        assert {**schema, **({"format_version": ("version", False)} if spec.format_version else {})} == spec.schema
        assert choices == spec.choices
    assert DEELBO.schema["lambda"] == ("positive", True) and DEELBO.schema["posterior_covariance"] == ("text", False)
    with pytest.raises(ValueError, match="kind='fraction'"):
        entry_field("fraction")


def test_save_pretrained_keeps_the_rest_of_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "num_labels": 3}))
    path = DEELBoConfig.from_learned(**LEARNED).save_pretrained(str(tmp_path))
    assert path == str(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "vit" and saved["num_labels"] == 3 and saved["deelbo"] == EXPECTED
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 and os.listdir(tmp_path) == ["config.json"]
    assert DEELBoConfig.from_pretrained(str(tmp_path)) == DEELBoConfig.from_learned(**LEARNED)


def test_save_pretrained_next_to_an_adapter_keeps_other_methods_entries(tmp_path):
    L2SPConfig(alpha=1e-3, beta=1e-4).save_pretrained(str(tmp_path))
    DEELBoConfig.from_learned(**LEARNED).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / ADAPTER_CONFIG_ENTRIES_NAME).read_text())
    assert saved["l2sp"] == {"alpha": 1e-3, "beta": 1e-4} and saved["deelbo"] == EXPECTED
    assert load_deelbo_config(str(tmp_path)) == EXPECTED
    assert L2SPConfig.from_pretrained(str(tmp_path)) == L2SPConfig(alpha=1e-3, beta=1e-4)


def test_tpgm_keeps_null_radii():
    entry = TPGMConfig(norm="l2", projection_steps=1).to_dict()
    assert entry["radii"] is None and TPGMConfig.from_dict(entry) == TPGMConfig(norm="l2", projection_steps=1)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_unknown_keys_are_warned_once_and_ignored():
    records, logger = _Records(), logging.getLogger("hf_deelbo.hub.config")
    logger.addHandler(records)
    try:
        entry = {**EXPECTED, "from_the_future": 1}
        first = DEELBoConfig.from_dict(entry, "a newer model's config")
        second = DEELBoConfig.from_dict(entry, "a newer model's config")
    finally:
        logger.removeHandler(records)
    warned = [message for message in records.messages if "from_the_future" in message]
    assert len(warned) == 1 and "does not know, which it ignores" in warned[0]
    assert first == second == DEELBoConfig.from_dict(EXPECTED)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 2}, "format_version is newer than this hf_deelbo reads"),
        ({"lambda": -1.0}, "deelbo.lambda must be a finite number > 0"),
        ({"posterior_covariance": "full"}, "must be one of"),
    ],
)
def test_a_bad_entry_is_one_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        DEELBoConfig.from_dict({**EXPECTED, **change})
    entry = {k: v for k, v in EXPECTED.items() if k != "format_version"}  # written before versions: reads
    assert DEELBoConfig.from_dict(entry) == DEELBoConfig.from_dict(EXPECTED)


def test_from_pretrained_reads_a_full_model_on_the_hub(hub, tmp_path):
    api = HfApi()
    api.create_repo("tester/typed-entry", exist_ok=True)
    config = {"model_type": "vit", "deelbo": EXPECTED}
    api.upload_file(
        path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id="tester/typed-entry"
    )
    assert DEELBoConfig.from_pretrained("tester/typed-entry") == DEELBoConfig.from_learned(**LEARNED)
    with pytest.raises(KeyError, match="no 'l2sp' entry"):
        L2SPConfig.from_pretrained("tester/typed-entry")
