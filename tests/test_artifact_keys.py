"""Artifact names by table: every config key enters the phases pipeline.ARTIFACT_KEYS says, and no
other; today's names stay what they were."""
import pytest
from omegaconf import OmegaConf

from d2dmoe.pipeline import ARTIFACT_KEYS, ONLY_WITH, artifacts, check_artifact_keys
from d2dmoe.validate import ConfigError, config_keys, nearest_entry
from tests.conftest import compose_config, params_needing_smollm2

# today's names, pinned: a change here renames, and so retrains, every user's artifacts. Pinned last
# when the dense reference became early-stopped, BBC's split 60/20/20 and the router defaults chosen
# on validation, and again when every data set lost its repeated items (d2dmoe.dedup), which
# renamed every phase on purpose. Names hash the resolved config, whose model and data paths are where this
# machine installed the packages; the pins fix those paths, so they hold anywhere.
PINNED_PATHS = ("model.path=/pinned/model", "data.path=/pinned/data")
PINNED = {
    (): ["dense-d4b967462af5", "sparsify-d28d31da8353", "split-3f3e868b6cc0", "routers-77eddbb67f38"],
    ("experiment=smoke",): ["dense-e8768fe2ad60", "sparsify-0c3d3d189b39", "split-c30ae1eb8bcf",
                            "routers-91608293c7da"],
    ("method=moefication",): ["dense-d4b967462af5", "sparsify-96a4ca101651", "split-db6dc834bb66",
                              "routers-d8bb90ede1c3"],
    ("attention.convert=true",): ["dense-d4b967462af5", "attention-171bdf933780", "sparsify-efc61e5805bc",
                                  "split-fb74f67de20b", "routers-5d5d2d188abf"],
    ("experiment=gpt2_bbc",): ["dense-ad0672de1bbe", "sparsify-9ff5df4311fd", "split-8d914197b9b3",
                               "routers-71fe0e2be573"],
    # the splits as the sources ship them, repeats and all: the names from before d2dmoe.dedup
    ("data.dedup=false",): ["dense-e2b0ff3f3671", "sparsify-e8b2ee135671", "split-d7570281cb0b", "routers-3e4624c38d84"],
    ("experiment=vit_fashion",): ["dense-2384b0bb61eb", "sparsify-430eb35320b1", "split-b71d853bf646",
                                  "routers-97fcef0dabe0"],
}


def names(cfg) -> dict[str, str]:
    return {phase: art.key for phase, art in artifacts(cfg).items()}


@pytest.mark.parametrize("overrides", PINNED)
def test_artifact_names_are_pinned(overrides):
    assert list(names(compose_config([*overrides, *PINNED_PATHS])).values()) == PINNED[overrides]


def test_every_config_key_has_an_artifact_decision(every_config):
    undecided = {k for _, cfg in every_config for k in config_keys(cfg) if nearest_entry(ARTIFACT_KEYS, k) is None}
    assert not undecided, f"keys without an entry in pipeline.ARTIFACT_KEYS: {sorted(undecided)}"


def changed(value):
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.25
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 3
    if isinstance(value, list):
        return value + [value[-1] if value else 1]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    raise TypeError(value)


def expected_changes(cfg, key: str, before: dict, after: dict) -> set[str]:
    """The phases the table says `key` renames: those it enters, and every phase after one of them."""
    enters = nearest_entry(ARTIFACT_KEYS, key)
    if isinstance(enters, str) or (key in ONLY_WITH and OmegaConf.select(cfg, ONLY_WITH[key]) in (False, None)):
        enters = ()
    chain = list(after) if len(after) > len(before) else list(before)  # the longer chain: every phase
    first = min((chain.index(p) for p in enters if p in chain), default=len(chain))
    return set(chain[first:])


WALKED = [[], ["experiment=smoke"], ["attention.convert=true"], ["method=moefication"], ["trainer=ddp"],
          ["trainer=fsdp"], ["experiment=gpt2_bbc"], ["experiment=vit_fashion"], ["experiment=smollm2_bbc"],
          ["data=c4"], ["routing=both"], ["trainer.gradient_clip_val=0.5"]]


@pytest.mark.parametrize("overrides", params_needing_smollm2(WALKED), ids=lambda o: " ".join(o) or "default")
def test_each_key_renames_exactly_the_phases_the_table_says(overrides):
    """Change every key's value, one at a time: the phases whose name changes are those the table
    gives for that key and the phases after them, no more and no fewer."""
    cfg = compose_config(overrides, artifacts_dir="/artifacts")
    before = names(cfg)
    for key in config_keys(cfg):
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        other = OmegaConf.create(OmegaConf.to_container(cfg))  # unresolved: interpolations still follow
        OmegaConf.update(other, key, changed(value), force_add=True)
        after = names(other)
        renamed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        assert renamed == expected_changes(cfg, key, before, after), f"{key}: {value!r} -> {changed(value)!r}"


@pytest.mark.parametrize("override", ["trainer.precision=bf16-mixed", "trainer.devices=2",
                                      "trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=1.0",
                                      "trainer=ddp"])
def test_trainer_settings_that_change_training_rename_the_trained_phases(override):
    default, other = names(compose_config()), names(compose_config([override]))
    assert all(other[p] != default[p] for p in default)


def test_a_key_without_a_decision_stops_before_compute():
    """A Lightning argument added on the command line: it might change the training, so it stops
    until the table decides."""
    with pytest.raises(ConfigError, match="^trainer.max_time: not known to the artifact names"):
        check_artifact_keys(compose_config(["+trainer.max_time=00:01:00:00"]))
    check_artifact_keys(compose_config(["+model.config.hidden_dropout_prob=0.2"]))  # enters dense, as model.*


def test_equivalent_trainer_settings_share_artifacts():
    """The same global batch and precision, spelled another way: the same artifacts."""
    assert names(compose_config(["trainer=ddp"])) == names(compose_config(["trainer=fsdp"]))
    assert names(compose_config(["trainer.precision=32"])) == names(compose_config())
    assert names(compose_config(["trainer.gradient_clip_algorithm=value"])) == names(compose_config())
