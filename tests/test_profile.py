"""Per-layer profile search (issue 16): OWL allocation, the level grid and its budget-preserving moves,
the layer database (built once, then only loaded), the searches, --layer-ratios, and bad input."""
from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest
import torch
from conftest import build_model, fresh_ray

from raysparse.cli.profile import profile_main
from raysparse.config import TrialConfig
from raysparse.errors import ConfigError
from raysparse.models.adapters import get_adapter
from raysparse.profile.database import ProfileAssembler, build_database
from raysparse.profile.levels import mutate, parse_levels, project, snap, target_index, total_sparsity
from raysparse.profile.search import evolve, optuna_search
from raysparse.prune import prune
from raysparse.sparsity.importance import outlier_ratio, owl_importance
from raysparse.trial.cache import StatsCache
from raysparse.trial.runner import run_trial

CALIB = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(0))


# --- the level grid and its moves -------------------------------------------------------------

def test_default_grid_holds_the_target_and_stays_below_one():
    levels = parse_levels(None, 0.8)
    assert levels[0] == pytest.approx(0.55) and levels[-1] == pytest.approx(0.95)
    assert levels[target_index(levels, 0.8)] == pytest.approx(0.8)
    assert parse_levels("0.5:0.9:0.1", 0.7) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize("text, fragment", [
    ("0.5,0.7,1.0", "outside [0, 1)"),
    ("-0.1:0.9:0.2", "outside [0, 1)"),
    ("0.5,0.6,0.8", "not evenly spaced"),
    ("0.42:0.92:0.1", "cannot reach the target 0.7"),
    ("0.7", "fewer than 2 levels"),
])
def test_bad_grids_are_refused(text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        parse_levels(text, 0.7)


def test_mutations_and_projection_keep_the_exact_total():
    levels = parse_levels(None, 0.7)
    sizes = [100] * 6 + [40] * 3
    start = [target_index(levels, 0.7)] * len(sizes)
    rng = random.Random(0)
    profile = start
    for _ in range(200):
        child = mutate(profile, sizes, len(levels), rng, max_step=2)
        assert all(0 <= i < len(levels) for i in child)
        assert total_sparsity(child, levels, sizes) == pytest.approx(0.7, abs=1e-12)
        profile = child
    assert profile != start  # it moved
    raw = [rng.uniform(0, len(levels) - 1) for _ in sizes]
    projected = project(raw, sizes, len(levels), start[0])
    assert total_sparsity(projected, levels, sizes) == pytest.approx(0.7, abs=1e-12)


def test_evolution_uses_cheap_fidelity_more_and_improves_a_known_optimum():
    optimum = [3, 7, 5, 5, 2, 8]  # sums to 6 * 5: on budget
    sizes = [1] * 6

    def evaluate(profiles, windows):
        noise = 0.0 if windows == 8 else 0.5
        return [sum((a - b) ** 2 for a, b in zip(p, optimum)) + noise for p in profiles]

    result = evolve([5] * 6, sizes, 11, evaluate, [2, 8], survivors=3, generations=60, offspring=8, seed=1)
    assert result.fitness < 0.2 * result.curve[0]
    assert result.curve == sorted(result.curve, reverse=True)  # the parent only ever improves
    assert sum(result.best) == 30
    assert result.evaluations[2] > 2 * result.evaluations[8]
    tpe = optuna_search([5] * 6, 5, sizes, 11, evaluate, 8, trials=24, batch=8, sampler="tpe")
    assert sum(tpe.best) == 30 and tpe.fitness <= tpe.curve[0]
    assert evaluate([[5] * 6], 8)[0] >= tpe.fitness  # the uniform start is its first proposal
    near = [4, 7, 5, 5, 2, 7]  # a non-uniform start (a heuristic's profile): scored first, never lost
    from_near = optuna_search(near, 5, sizes, 11, evaluate, 8, trials=8, batch=4, sampler="tpe")
    assert sum(from_near.best) == 30 and from_near.fitness <= evaluate([near], 8)[0]
    evolved = evolve(near, sizes, 11, evaluate, [2, 8], survivors=3, generations=5, offspring=4, seed=1)
    assert evolved.curve[0] == evaluate([near], 8)[0] and evolved.fitness <= evolved.curve[0]


def test_snapping_a_free_profile_onto_the_grid_keeps_the_exact_total():
    levels = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # target 0.6 = index 3
    assert snap([0.6, 0.6, 0.6], levels, [1, 1, 1], 3) == [3, 3, 3]
    assert snap([0.4, 0.8, 0.6], levels, [1, 1, 1], 3) == [1, 5, 3]  # on the grid: unchanged
    clamped = snap([0.1, 0.95, 0.75], levels, [1, 1, 1], 3)  # outside the grid, and over budget once clamped
    assert all(0 <= i < 7 for i in clamped) and sum(clamped) == 9 and clamped[0] == 0
    assert clamped[1] >= clamped[2]  # the order of the free ratios survives
    mixed = snap([0.52, 0.71, 0.66, 0.55], levels, [2, 1, 2, 1], 3)  # two size groups, each on its own budget
    assert mixed[0] + mixed[2] == 6 and mixed[1] + mixed[3] == 6


# --- OWL ------------------------------------------------------------------------------------------

def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.ones(10, 10), torch.tensor([[100.0, 1.0]])]  # mean = 200/102 ~ 1.96
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 102)
    assert outlier_ratio(scores, 100.0) == 0.0


def test_owl_scores_rise_with_planted_outliers():
    model = build_model("llama", layers=3)
    adapter = get_adapter(model)
    before = owl_importance(adapter, CALIB, m=5.0, batch_size=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in adapter.prunable_linears(adapter.decoder_layers()[1]).values():
            flat = module.weight.view(-1)
            flat[torch.randperm(flat.numel(), generator=generator)[:flat.numel() // 25]] *= 200
    after = owl_importance(adapter, CALIB, m=5.0, batch_size=2)
    assert len(after) == 3 and all(0.0 <= s < 1.0 for s in after)
    assert after[0] == before[0]  # same weights, same (dense) inputs
    assert after[1] > before[1] + 0.01  # 4% of its weights scaled up 200x: most become outliers


# --- the layer database -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_database_is_built_once_then_loaded_and_assembles_the_levels(method, tmp_path):
    model = build_model("llama", layers=2)
    adapter = get_adapter(model)
    levels = [0.3, 0.5, 0.7]
    cache = StatsCache(tmp_path / "db")

    def through_cache(index, make):
        return cache.get_or_compute({"kind": "profile_layer", "layer": index, "method": method}, make)

    dense = {n: p.detach().clone() for n, p in adapter.prunable_weights().items()}
    first = build_database(adapter, method, CALIB, levels, torch.device("cpu"), 2, get_or_compute=through_cache)
    assert all(torch.equal(p, dense[n]) for n, p in adapter.prunable_weights().items())  # left dense
    second = build_database(adapter, method, CALIB, levels, torch.device("cpu"), 2, get_or_compute=through_cache)
    assert [e["outcome"] for e in cache.events] == ["computed", "computed", "hit", "hit"]
    for a, b in zip(first, second):
        for x, y in zip(a["entries"], b["entries"]):
            assert all(torch.equal(x[name][part], y[name][part]) for name in x for part in x[name])

    # Layer 0 sees the same (dense) inputs in a one-shot prune: the same result at the same level.
    oneshot = build_model("llama", layers=2)
    masks = prune(get_adapter(oneshot), TrialConfig(method=method, sparsity="0.5", calib_batch_size=2), CALIB,
                  torch.device("cpu"))
    assembler = ProfileAssembler(adapter, second)
    assembler.apply([1, 2])
    for name, param in get_adapter(oneshot).prunable_weights().items():
        if ".layers.0." in name:
            assert torch.equal(masks[name], adapter.prunable_weights()[name] != 0) or method == "sparsegpt"
            torch.testing.assert_close(adapter.prunable_weights()[name], param, rtol=1e-4, atol=1e-5)
    for index, level in ((0, 0.5), (1, 0.7)):
        layer = adapter.decoder_layers()[index]
        weights = [m.weight for m in adapter.prunable_linears(layer).values()]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(level, abs=0.03)


# --- end to end: search, --layer-ratios, checks ---------------------------------------------------

def _flags(model_dir, text_files, out, *extra):
    return ["--model", str(model_dir), "--sparsity", "0.6", "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--calib-data", str(text_files["calib"]), "--val-data", str(text_files["val"]),
            "--eval-data", str(text_files["eval"]), "--output", str(out), "-q", *extra]


def test_search_writes_a_profile_that_prune_accepts_and_refuses_for_another_model(
        saved_model_dir, text_files, tmp_path, capsys):
    model_dir = saved_model_dir()
    out = tmp_path / "search"
    code = profile_main(_flags(model_dir, text_files, out, "--profile-levels", "0.4:0.8:0.1", "--generations", "3",
                               "--offspring", "3", "--survivors", "2", "--fidelity", "1,2", "--no-compare",
                               "--rescore", "2", "--eval-max-windows", "2"))
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "best_profile.json").read_text())
    record = json.loads((out / "profile_search.json").read_text())
    assert saved["num_layers"] == 2 and saved["fingerprint"]
    assert sum(saved["layer_ratios"]) / 2 == pytest.approx(0.6)
    assert record["kl"] <= record["kl_uniform"] + 1e-9 and record["database"] == {"computed": 2}
    assert (out / "profile.png").stat().st_size > 1000
    rescored = record["rescored"]  # re-pruned sequentially, best validation perplexity first, and chosen
    assert 1 <= len(rescored) <= 3 and [r["val_ppl"] for r in rescored] == sorted(r["val_ppl"] for r in rescored)
    assert record["profile"] == rescored[0]["profile"]
    assert [2, 2] in [r["profile"] for r in rescored]  # the start (uniform: 0.6 = level 2) always competes
    again = profile_main(_flags(model_dir, text_files, tmp_path / "again", "--profile-levels", "0.4:0.8:0.1",
                                "--generations", "1", "--offspring", "2", "--fidelity", "1,2", "--no-compare",
                                "--storage", str(out / "layer_db"), "--start", "best", "--start-alphas", "0.5,3",
                                "--importance-samples", "2", "--rescore", "1"))
    assert again == 0
    second = json.loads((tmp_path / "again" / "profile_search.json").read_text())
    assert second["database"] == {"hit": 2}
    kls = second["start"]["kl"]  # every heuristic scored once on validation; the lowest is the start
    assert set(kls) == {"uniform", "importance a=0.5", "importance a=3", "owl a=0.5", "owl a=3"}
    assert second["start"]["name"] == min(kls, key=kls.get) and second["searched"]["kl"] <= min(kls.values()) + 1e-9
    assert second["kl_uniform"] == kls["uniform"]
    # every start candidate is re-pruned too, on the grid and each heuristic as it is: the answer
    # is never worse on validation than any of them
    rescored = second["rescored"]
    assert all(p in [r["profile"] for r in rescored] for p in second["start"]["candidates"].values())
    off_grid = {r["name"] for r in rescored if r["profile"] is None}
    assert off_grid and off_grid <= set(kls) - {"uniform"}
    assert second["chosen"] == rescored[0]["name"] and second["layer_ratios"] == rescored[0]["ratios"]
    assert rescored[0]["val_ppl"] == min(r["val_ppl"] for r in rescored)
    assert all(r["kl_pruned"] > 0 for r in rescored) and second["rescore_s"] > 0
    assert second["total_sparsity"] == pytest.approx(0.6, abs=0.01)
    from_file = profile_main(_flags(model_dir, text_files, tmp_path / "from-file", "--profile-levels", "0.4:0.8:0.1",
                                    "--generations", "1", "--offspring", "2", "--fidelity", "1,2", "--no-compare",
                                    "--storage", str(out / "layer_db"), "--start", str(out / "best_profile.json")))
    assert from_file == 0  # a saved profile restarts the search where the first one ended
    third = json.loads((tmp_path / "from-file" / "profile_search.json").read_text())
    assert third["start"]["profile"] == record["profile"] and third["kl"] <= record["kl"] + 1e-6

    base = dict(model=str(model_dir), method="wanda", sparsity="0.6", nsamples=4, seqlen=32, eval_seqlen=32,
                eval_max_windows=2, calib_data=str(text_files["calib"]), val_data=str(text_files["val"]),
                eval_data=str(text_files["eval"]))
    summary = run_trial(TrialConfig(**base, layer_ratios=str(out / "best_profile.json"))).summary
    for layer, ratio in enumerate(saved["layer_ratios"]):
        assert summary["per_layer"][str(layer)] == pytest.approx(ratio, abs=2 / 64)
    for change, fragment in (({"num_layers": 3, "layer_ratios": saved["layer_ratios"] + [0.6]}, "3 layers"),
                             ({"fingerprint": "0" * 32}, "another model"),
                             ({"layer_ratios": [0.5, 0.5]}, "not the target")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**saved, **change}))
        with pytest.raises(ConfigError, match=fragment):
            run_trial(TrialConfig(**base, layer_ratios=str(bad)))


def test_owl_allocation_inside_a_trial(saved_model_dir, text_files):
    summary = run_trial(TrialConfig(
        model=str(saved_model_dir()), method="sparsegpt", sparsity="0.5", pruning_strategy="inverse", alpha=2.0,
        importance_method="owl", owl_m=3.0, importance_samples=4, nsamples=4, seqlen=32, eval_seqlen=32,
        eval_max_windows=2, calib_data=str(text_files["calib"]), val_data=str(text_files["val"]),
        eval_data=str(text_files["eval"]))).summary
    importance = summary["layer_importance"]
    assert importance["method"] == "owl" and importance["owl_m"] == 3.0
    ratios = summary["history"][-1]["layer_ratios"]
    assert ratios[0] != pytest.approx(ratios[1]) and sum(ratios) / 2 == pytest.approx(0.5)
    assert ratios[importance["scores"].index(max(importance["scores"]))] == min(ratios)


@pytest.mark.parametrize("extra, fragment", [
    (["--profile-levels", "0.5,0.6,1.2"], "outside [0, 1)"),
    (["--profile-levels", "0.35:0.85:0.1"], "cannot reach the target"),
    (["--sparsity", "2:4"], "N:M pattern"),
    (["--method", "magnitude"], "wanda or sparsegpt"),
    (["--fidelity", "8,2"], "increasing"),
    (["--rounds", "2", "--rescore", "2"], "--database anchored"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--rescore-seeds", "0"], "--rescore-seeds must be >= 1"),
    (["--owl-m", "0"], "owl_m"),
    (["--start", "nowhere.json"], "file not found"),
    (["--start-alphas", "1,x"], "--start-alphas"),
    *([(["--search", "cmaes"], "pip install cmaes")] if importlib.util.find_spec("cmaes") is None else []),
])
def test_bad_profile_requests_are_one_line_errors_before_any_work(extra, fragment, text_files, tmp_path, capsys):
    out = tmp_path / "never"
    assert profile_main(_flags(tmp_path / "no-model-needed", text_files, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and fragment in err
    assert not out.exists()


def test_layer_ratios_setting_is_checked_up_front(tmp_path):
    with pytest.raises(ConfigError, match="drop --pruning-strategy"):
        TrialConfig(layer_ratios="x.json", pruning_strategy="inverse").validate()
    with pytest.raises(ConfigError, match="N:M"):
        TrialConfig(layer_ratios="x.json", sparsity="2:4").validate()
    from raysparse.config.inputs import check_inputs

    with pytest.raises(ConfigError, match="file not found"):
        check_inputs(TrialConfig(layer_ratios=str(tmp_path / "missing.json")).validate())
    from raysparse.search.space_file import parse_space

    space = parse_space({"fixed": {"method": "wanda", "sparsity": 0.8, "layer_ratios": "runs/p/best_profile.json"},
                         "params": {"lr": {"loguniform": [1e-5, 1e-3]}}}, "space")
    assert space.fixed["layer_ratios"] == "runs/p/best_profile.json"  # a search's trials start from it


@pytest.mark.slow
def test_ray_actors_score_profiles_as_the_process_does(saved_model_dir):
    """The parallel path: actors load their own model and read the database from the object store."""
    from raysparse.profile.fitness import ParallelEvaluator, ProfileEvaluator, log_probs, remote_evaluators

    model_dir = saved_model_dir()
    from raysparse.models.loading import load_model

    loaded = load_model(str(model_dir), "cpu", "auto", False)
    database = build_database(loaded.adapter, "wanda", CALIB, [0.3, 0.5, 0.7], torch.device("cpu"), 2)
    windows = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = log_probs(loaded.model, windows, 2, torch.device("cpu"))
    profiles = [[1, 1], [0, 2], [2, 0]]
    local = ParallelEvaluator(local=ProfileEvaluator(loaded.model, database, windows, reference, 2))(profiles, 3)
    with fresh_ray():
        actors = remote_evaluators(2, str(model_dir), "auto", False, database, windows, reference, 2)
        remote = ParallelEvaluator(actors=actors)(profiles, 3)
    assert remote == pytest.approx(local, rel=1e-4)
    assert len(set(round(v, 6) for v in local)) == 3  # the profiles differ, and so do their scores


@pytest.mark.parametrize("shape", [(8, 8), (5, 3), (1, 13)])
def test_compact_entries_round_trip_exactly(shape):
    """Packed keep bits and kept values put back the very matrix (zeros kept as zeros where the
    mask keeps them), for shapes that do not fill the last byte."""
    from raysparse.profile.database import compact_entry, pack_mask, unpack_mask, write_entry

    torch.manual_seed(0)
    weight = torch.randn(shape)
    keep = torch.rand(shape) > 0.6
    weight[keep.nonzero()[0][0], keep.nonzero()[0][1]] = 0.0  # a kept zero stays kept
    assert torch.equal(unpack_mask(pack_mask(keep), shape), keep)
    assert pack_mask(keep).numel() == -(-keep.numel() // 8)
    pruned = weight * keep
    out = torch.full(shape, 7.0)
    write_entry(out, weight, compact_entry(pruned, keep, with_values=True))
    assert torch.equal(out, pruned)
    out = torch.full(shape, 7.0)
    write_entry(out, weight, compact_entry(pruned, keep, with_values=False))  # a mask: the dense values under it
    assert torch.equal(out, weight * keep)


# --- the anchored database ------------------------------------------------------------------------

def test_an_anchored_grid_centres_each_layer_on_its_ratio_and_keeps_moves_inside_0_1():
    from raysparse.profile.levels import Grid

    grid = Grid.build(parse_levels("0.5:0.9:0.1", 0.7), 0.7, [0.55, 0.85, 0.7, 0.7])
    assert grid.anchored and grid.centre == 2
    assert grid.ratios([2, 2, 2, 2]) == [0.55, 0.85, 0.7, 0.7]
    assert grid.bounds() == [(0, 4), (0, 3), (0, 4), (0, 4)]  # 0.85 + 0.2 would be >= 1
    assert grid.layer_levels(1) == [0.65, 0.75, 0.85, 0.95]
    sizes = [10, 10, 10, 10]
    rng = random.Random(0)
    profile = [2, 2, 2, 2]
    for _ in range(200):
        profile = mutate(profile, sizes, 5, rng, max_step=2, bounds=grid.bounds())
        assert all(lo <= j <= hi for j, (lo, hi) in zip(profile, grid.bounds()))
        assert sum(grid.ratios(profile)) / 4 == pytest.approx(0.7)
    projected = project([4.4, 4.4, 0.0, 1.0], sizes, 5, 2, grid.bounds())
    assert projected[1] <= 3 and sum(projected) == 8
    assert not Grid.build([0.3, 0.5], 0.5, 3).anchored
    with pytest.raises(ConfigError, match="outside"):
        Grid.build([0.3, 0.5], 0.5, [0.5, 1.0])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_assembling_the_anchor_of_an_anchored_database_is_its_sequential_prune(method):
    """Entries calibrated on the anchor's pruned inputs: the all-centre profile is exactly the
    one-shot prune at the anchor ratios, layer 1 included (a dense-calibrated entry is not)."""
    from raysparse.profile.levels import Grid

    anchor = [0.4, 0.65]
    grid = Grid.build([0.4, 0.5, 0.6], 0.5, anchor)
    bounds = grid.bounds()
    per_layer = [grid.layer_levels(i) for i in range(2)]
    model = build_model("llama", layers=2)
    adapter = get_adapter(model)
    database = build_database(adapter, method, CALIB, per_layer, torch.device("cpu"), 2,
                              inputs_from=[grid.centre - lo for lo, _ in bounds], firsts=[lo for lo, _ in bounds])
    dense = build_database(adapter, method, CALIB, per_layer, torch.device("cpu"), 2,
                           firsts=[lo for lo, _ in bounds])
    oneshot = build_model("llama", layers=2)
    prune(get_adapter(oneshot), TrialConfig(method=method, sparsity="0.5", calib_batch_size=2), CALIB,
          torch.device("cpu"), anchor)
    expected = get_adapter(oneshot).prunable_weights()
    for db, exact in ((database, True), (dense, False)):
        ProfileAssembler(adapter, db).apply([grid.centre, grid.centre])
        layer1 = [n for n in expected if ".layers.1." in n]
        close = all(torch.allclose(adapter.prunable_weights()[n], expected[n], rtol=1e-4, atol=1e-5) for n in layer1)
        assert close == exact or (method == "wanda" and not exact)  # Wanda's masks may agree by chance
        for name in expected:
            if ".layers.0." in name or exact:
                torch.testing.assert_close(adapter.prunable_weights()[name], expected[name], rtol=1e-4, atol=1e-5)


def test_anchored_search_starts_from_the_best_heuristic_as_it_is_and_never_ends_worse(
        saved_model_dir, text_files, tmp_path, capsys):
    model_dir = saved_model_dir()
    flags = ["--method", "sparsegpt", "--profile-levels", "0.4:0.8:0.1", "--generations", "2", "--offspring", "3", "--fidelity", "1,2",
             "--no-compare", "--database", "anchored", "--start", "best", "--start-alphas", "0.5,3",
             "--importance-samples", "2", "--rescore", "2", "--storage", str(tmp_path / "db")]
    assert profile_main(_flags(model_dir, text_files, tmp_path / "a", *flags)) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "a" / "profile_search.json").read_text())
    rescored = record["rescored"]
    heuristics = {"uniform", "importance a=0.5", "importance a=3", "owl a=0.5", "owl a=3"}
    assert heuristics <= {r["name"] for r in rescored}  # every candidate pruned once, as it is
    anchor_row = min((r for r in rescored if r["name"] in heuristics), key=lambda r: r["val_ppl"])
    assert record["start"]["name"] == anchor_row["name"] and record["anchor"] == anchor_row["ratios"]
    # the assembled anchor is its sequential prune: the search's KL of the start equals the prune's
    assert record["start"]["kl"][anchor_row["name"]] == pytest.approx(anchor_row["kl_pruned"], rel=1e-3)
    assert record["chosen"] == rescored[0]["name"] and rescored[0]["val_ppl"] <= anchor_row["val_ppl"]
    assert record["total_sparsity"] == pytest.approx(0.6, abs=1e-6) and record["database"] == {"computed": 2}
    assert profile_main(_flags(model_dir, text_files, tmp_path / "b", *flags)) == 0
    assert json.loads((tmp_path / "b" / "profile_search.json").read_text())["database"] == {"hit": 2}


def test_cross_entropy_fitness_is_the_models_own_loss(saved_model_dir):
    """`ce` scores a window as transformers' causal-LM loss does (the mean over predicted tokens)."""
    from raysparse.models.loading import load_model
    from raysparse.profile.fitness import cross_entropy, fitness

    loaded = load_model(str(saved_model_dir()), "cpu", "auto", False)
    windows = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = float(loaded.model(input_ids=windows, labels=windows).loss)
    assert cross_entropy(loaded.model, windows, 3, 2, torch.device("cpu")) == pytest.approx(loss, rel=1e-5)
    assert fitness(loaded.model, windows, None, 3, 2, torch.device("cpu")) == pytest.approx(loss, rel=1e-5)


def test_a_cross_entropy_search_scores_what_the_rescoring_measures(saved_model_dir, text_files, tmp_path, capsys):
    """With `--fitness ce` on the windows the validation perplexity reads, a re-pruned
    candidate's fitness is the log of its validation perplexity: the search and the rescoring
    judge by one measure."""
    out = tmp_path / "ce"
    code = profile_main(_flags(saved_model_dir(), text_files, out, "--profile-levels", "0.4:0.8:0.1",
                               "--generations", "2", "--offspring", "3", "--survivors", "2", "--fidelity", "1,2",
                               "--no-compare", "--rescore", "2", "--eval-max-windows", "2", "--fitness", "ce"))
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "profile_search.json").read_text())
    assert record["fitness"] == "ce" and record["options"]["fitness"] == "ce"
    assert record["kl"] <= record["kl_uniform"] + 1e-9
    for row in record["rescored"]:
        assert math.exp(row["kl_pruned"]) == pytest.approx(row["val_ppl"], rel=1e-4)


def test_rounds_re_centre_the_database_on_each_winner_and_keep_the_best(saved_model_dir, text_files, tmp_path, capsys):
    """Each round is anchored on the previous round's winner, the anchor competes in its
    rescoring (so validation never gets worse from round to round), and the answer is the
    best round's profile."""
    out = tmp_path / "rounds"
    flags = ["--method", "sparsegpt", "--profile-levels", "0.4:0.8:0.1", "--generations", "3", "--offspring", "4",
             "--fidelity", "1,2", "--no-compare", "--database", "anchored", "--rescore", "2", "--rounds", "3",
             "--eval-max-windows", "2"]
    assert profile_main(_flags(saved_model_dir(), text_files, out, *flags)) == 0, capsys.readouterr().err
    record = json.loads((out / "profile_search.json").read_text())
    rounds = record["rounds"]
    assert 2 <= len(rounds) <= 3 and (rounds[-1]["converged"] or len(rounds) == 3)
    assert all(not r["converged"] for r in rounds[:-1])
    for before, after in zip(rounds, rounds[1:]):
        assert after["anchor"] == pytest.approx(before["layer_ratios"])  # re-centred on the winner
        assert after["val_ppl"] <= before["val_ppl"] * (1 + 1e-4)  # the anchor competed
        assert (out / f"round-{after['round']}" / "profile_search.json").exists()
        # the anchor is the previous winner, pruned then: its numbers are reused, not re-measured
        rescored = json.loads((out / f"round-{after['round']}" / "profile_search.json").read_text())["rescored"]
        anchor_row = next(r for r in rescored if r["ratios"] == pytest.approx(after["anchor"], abs=1e-9))
        assert anchor_row.get("measured_before") is True and anchor_row["val_ppl"] == before["val_ppl"]
    first = json.loads((out / "round-1" / "profile_search.json").read_text())["rescored"]
    assert not any(r.get("measured_before") for r in first)  # nothing to reuse in the first round
    best = min(rounds, key=lambda r: r["val_ppl"])
    assert record["best_round"] == best["round"] and record["layer_ratios"] == best["layer_ratios"]
    saved = json.loads((out / "best_profile.json").read_text())
    assert saved["layer_ratios"] == pytest.approx(best["layer_ratios"])
    assert record["rounds_total"]["search_s"] >= max(r["search_s"] for r in rounds)


def test_rescoring_with_several_calibration_draws_ranks_by_their_mean(saved_model_dir, text_files, tmp_path, capsys):
    """--rescore-seeds 2: every candidate pruned with the trial's own draw and one more; the first
    draw is exactly what a single-draw rescoring measures, and the ranking reads the mean."""
    model_dir = saved_model_dir()
    flags = ["--profile-levels", "0.4:0.8:0.1", "--generations", "2", "--offspring", "3", "--fidelity", "1,2",
             "--no-compare", "--rescore", "2", "--eval-max-windows", "2", "--storage", str(tmp_path / "db")]
    assert profile_main(_flags(model_dir, text_files, tmp_path / "one", *flags)) == 0, capsys.readouterr().err
    assert profile_main(_flags(model_dir, text_files, tmp_path / "two", *flags, "--rescore-seeds", "2")) == 0
    one = {r["name"]: r for r in json.loads((tmp_path / "one" / "profile_search.json").read_text())["rescored"]}
    two = json.loads((tmp_path / "two" / "profile_search.json").read_text())["rescored"]
    assert {r["name"] for r in two} == set(one)
    for row in two:
        first, second = row["val_ppl_seeds"]
        assert first == pytest.approx(one[row["name"]]["val_ppl"], rel=1e-5)
        assert row["val_ppl"] == pytest.approx((first + second) / 2)
    assert any(abs(r["val_ppl_seeds"][0] - r["val_ppl_seeds"][1]) > 1e-6 for r in two)  # the draws differ
    assert [r["val_ppl"] for r in two] == sorted(r["val_ppl"] for r in two)
