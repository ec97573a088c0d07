"""Every config composes; bad values stop before any compute with a message naming the key."""
import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from d2dmoe.figures import default_alpha
from d2dmoe.models import Dims
from d2dmoe.validate import CHECKS, ConfigError, Rule, check_config, check_model, config_keys, nearest_entry
from tests.conftest import CONF, compose_config, params_needing_smollm2

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", params_needing_smollm2(EXPERIMENTS))
def test_every_experiment_composes_and_passes_checks(name):
    cfg = compose_config([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    check_config(cfg)


def sweep_jobs(name: str) -> list[list[str]]:
    """Each job's overrides in the experiment's sweep (hydra.sweeper.params, a grid; its own or one it
    builds on, as fig_main_vit takes fig_main's)."""
    params = compose_config([f"experiment={name}"], hydra=True).hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    choices = [[f"{o.key_or_group}={v}" for v in o.sweep_iterator()] for o in parsed]
    return [[f"experiment={name}", *job] for job in itertools.product(*choices)]


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if len(sweep_jobs(n)) > 1])
def test_every_sweep_job_composes_and_passes_checks(name):
    for job in sweep_jobs(name):
        check_config(compose_config(job))


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.startswith("fig_main")])
def test_main_figure_sweeps_give_both_methods_the_same_router_search_on_three_seeds(name):
    """D2DMoE at the experiment's alpha (the headline: first in each seed) and MoEfication, each
    over the same router settings, seed by seed."""
    own_alpha = compose_config([f"experiment={name}"]).sparsity.alpha
    jobs = [compose_config(job) for job in sweep_jobs(name)]
    methods = {(c.method.name, c.sparsity.alpha, c.routing.rule) for c in jobs}
    assert methods == {("d2dmoe", own_alpha, "dynk"), ("moefication", 0.0, "topk")} and own_alpha > 0
    searched = {m: sorted((c.seed, c.routing.router.lr, c.routing.router.epochs) for c in jobs if c.method.name == m)
                for m in ("d2dmoe", "moefication")}
    assert searched["d2dmoe"] == searched["moefication"] and len(searched["d2dmoe"]) == 3 * 9  # seeds x lr x epochs
    assert {s for s, _, _ in searched["d2dmoe"]} == {0, 1, 2}
    assert jobs[0].method.name == "d2dmoe" and jobs[0].seed == 0


def test_experiments_exist():
    assert {"minilm_carer", "bert_carer", "smoke"} <= set(EXPERIMENTS)


def test_default_is_minilm_on_bbc_news():
    cfg = compose_config()
    assert (cfg.model.name, cfg.data.name, cfg.routing.rule) == ("minilm", "bbc_news", "dynk")
    assert Path(cfg.model.path, "model.safetensors").is_file()
    assert Path(cfg.data.path, "sports").is_dir()


def test_topk_routing_shares_the_router_settings():
    dynk, topk = compose_config(), compose_config(["routing=topk", "routing.ks=[1,2,4,8]"])
    assert dynk.routing.router == topk.routing.router
    assert list(topk.routing.ks) == [1, 2, 4, 8]


@pytest.mark.parametrize("overrides, key", [
    (["routing.taus=[0.5,1.5]"], "routing.taus"),
    (["routing.taus=[-0.1]"], "routing.taus"),
    (["routing.taus=[]"], "routing.taus"),
    (["routing=topk", "routing.ks=[0,2]"], "routing.ks"),
    (["routing=topk", "routing.ks=[]"], "routing.ks"),
    (["routing=both", "routing.ks=[0]"], "routing.ks"),
    (["routing=both", "routing.taus=[2]"], "routing.taus"),
    (["sparsity.alpha=-0.01"], "sparsity.alpha"),
    (["sparsity.penalty=l3"], "sparsity.penalty"),
    (["sparsity.schedule=cosine"], "sparsity.schedule"),
    (["experts.expert_size=24"], "experts"),
    (["experts.impl=sparse"], "experts.impl"),
    (["sparsity.activation=gelu"], "sparsity.activation"),
    (["routing.router.kind=softmax"], "routing.router.kind"),
    (["model.family=resnet"], "model.family"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        check_config(compose_config(overrides))
    assert err.value.key == key
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("override", [
    "routing.router.lr=-0.001", "dense.lr=0", "sparsity.lr=-1", "attention.lr=0", "data.batch_size=0",
    "data.eval_batch_size=-4", "sparsity.epochs=-2", "dense.epochs=1.5", "routing.router.epochs=-1",
    "sparsity.max_steps=-2", "dense.max_steps=0.5", "routing.router.hidden=0", "attention.router_hidden=0",
    "attention.num_experts=0", "data.limit_train=0", "data.limit_eval=-1", "data.max_length=0",
    "experts.num_experts=0", "experts.kmeans_n_init=0", "routing.rule=sometimes", "routing=topk routing.ks=[1.5]",
    "convert.budget=0", "convert.budget=null", "convert.layer_taus=[0.5,2]", "convert.profile_batches=0",
    "convert.per_layer=maybe", "convert.out=''", "sparsity.weight_decay=-0.1", "dense.warmup_fraction=1.5",
    "data.val_fraction=0", "data.test_fraction=1", "checkpoint_every=-1", "logger.mode=sometimes",
    "sparsity.alpha=nan", "routing.taus=[0.5,.nan]",
])
def test_each_bad_value_fails_before_compute_naming_its_key(override):
    key = override.split()[-1].split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}: ") as err:
        check_config(compose_config(override.split()))
    assert err.value.key == key


@pytest.mark.parametrize("override", [
    "sparsity.max_steps=-1", "sparsity.max_steps=0", "dense.epochs=0", "data.limit_train=null",
    "data.limit_train=1", "convert.profile_batches=null", "routing.router.hidden=1", "sparsity.alpha=0",
    "convert.budget=2", "routing.taus=[0,1]", "dense.warmup_fraction=0", "checkpoint_every=0",
    "sparsity.attention_lr=null", "data.batch_size=1", "routing.router.hidden=null",
])
def test_values_at_the_edge_of_the_allowed_range_pass(override):
    check_config(compose_config([override]))


def test_every_config_key_is_checked_or_deliberately_not(every_config):
    """A key added to conf/ later fails here until validate.CHECKS decides how to check it (or says
    why not)."""
    undecided = {k for _, cfg in every_config for k in config_keys(cfg) if nearest_entry(CHECKS, k) is None}
    assert not undecided, f"keys without an entry in validate.CHECKS: {sorted(undecided)}"


def test_every_check_applies_to_a_real_key_and_fires(every_config):
    """Each rule names a key some config has (no typo leaves it idle), and check_config enforces it:
    a value the rule rejects stops with that key."""
    from omegaconf import OmegaConf

    candidates = [-2, -1, 0, 0.5, 1.5, "", "nonsense", None, [], [-1], [2.5], True]
    for key, rule in CHECKS.items():
        if not isinstance(rule, Rule):
            continue
        holders = [o for o, cfg in every_config if OmegaConf.select(cfg, key, default=KeyError) is not KeyError]
        assert holders, f"validate.CHECKS checks {key}, which no config has"
        bad = [v for v in candidates if not rule.ok(v)]
        assert bad, key
        cfg = compose_config(holders[0])
        OmegaConf.update(cfg, key, bad[0], force_add=True)
        with pytest.raises(ConfigError) as err:
            check_config(cfg)
        assert err.value.key == key, (key, bad[0], str(err.value))


MINILM = Dims(layers=6, d=384, d_ff=1536, num_labels=5)


@pytest.mark.parametrize("overrides, key, words", [
    (["experts.num_experts=100"], "experts.num_experts", "does not divide the FFN width 1536"),
    (["experts.num_experts=null", "experts.expert_size=25"], "experts.expert_size", "does not divide"),
    (["routing=topk", "routing.ks=[1,129]"], "routing.ks", "exceeds the number of experts 128"),
    (["routing/router=moefication_original", "routing.router.hidden=64"], "routing.router.hidden",
     "as wide as its 128 experts: set null"),
    (["routing/router=moefication_original", "attention.convert=true", "attention.router_hidden=32"],
     "attention.router_hidden", "as wide as its 16 experts"),
])
def test_shape_checks_name_the_key(overrides, key, words):
    cfg = compose_config(overrides)
    check_config(cfg)
    with pytest.raises(ConfigError, match=words) as err:
        check_model(cfg, MINILM)
    assert err.value.key == key


@pytest.mark.parametrize("experiment", [None, "minilm_carer", "smoke"])
def test_moefication_method_holds_under_every_experiment(experiment):
    """MoEfication: no sparsity penalty, BCE routers, top-k; D2DMoE (the default): the opposite."""
    extra = [f"experiment={experiment}"] if experiment else []
    moef = compose_config(extra + ["method=moefication"])
    assert (moef.method.name, moef.sparsity.alpha, moef.routing.rule, moef.routing.router.kind) == \
        ("moefication", 0.0, "topk", "moefication")
    d2d = compose_config(extra)
    assert (d2d.method.name, d2d.routing.rule, d2d.routing.router.kind) == ("d2dmoe", "dynk", "regression")
    assert d2d.sparsity.alpha > 0
    # the rest of the router settings are shared, and command-line overrides still win
    assert moef.routing.router.hidden == d2d.routing.router.hidden
    ablation = compose_config(extra + ["method=moefication", "sparsity.alpha=0.01", "routing=dynk"])
    assert (ablation.sparsity.alpha, ablation.routing.rule) == (0.01, "dynk")


def test_plus_sparsity_arm_and_figures_repeat_the_default_alpha():
    """The phases ablation's "+ sparsity" arm is MoEfication with the default's penalty: a method's
    settings override the sparsity group, so the arm repeats the value and must follow it. The figure
    scripts read the group file alone (no Hydra at import), which must give the composed default."""
    default = compose_config([]).sparsity.alpha
    assert compose_config(["ablation=plus_sparsity"]).sparsity.alpha == default
    assert default_alpha() == default


def test_unknown_model_or_data_name_lists_the_choices():
    for group in ("model", "data"):
        with pytest.raises(HydraException, match=f"Available options in '{group}'"):
            compose_config([f"{group}=no_such_thing"])
