"""PrunE edge pruning (tapioca.pruning.edges): selector, Gumbel masks, regularisers, training, checkpoints, controls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tapioca.config import EdgePruningConfig, GNNConfig, GraphTrainConfig
from tapioca.errors import CheckpointError
from tapioca.models.gnn import GraphNet
from tapioca.pruning import edges as E
from tapioca.tasks.graph_data import GraphBatch, GraphMotifTask, GraphTaskConfig

MODEL = GNNConfig(n_layer=2, width=16, mlp_ratio=2)
TRAINED_MODEL = GNNConfig(n_layer=3, width=32, mlp_ratio=2)  # learns the motifs within ~250 steps
TRAIN = GraphTrainConfig(batch_size=32, checkpoint_every=10, grad_clip=1.0)


@pytest.fixture(scope="module")
def graphs() -> GraphBatch:
    return GraphMotifTask(GraphTaskConfig()).data("id", "train", 0, 256)


def hand_batch() -> GraphBatch:
    """Three graphs: a path 0-1-2 (edge 0-1 in the motif), one edge 3-4, and a lone node 5 without edges."""
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]])
    return GraphBatch(x=torch.ones(6, 1), edge_index=edge_index, node_ptr=torch.tensor([0, 3, 5, 6]),
                      edge_ptr=torch.tensor([0, 4, 6, 6]), y=torch.tensor([0, 1, 2]),
                      motif_edges=torch.tensor([True, True, False, False, False, False]), base=torch.zeros(3).long())


def fresh_pruner(seed: int = 0) -> E.EdgePruner:
    torch.manual_seed(seed)
    return E.EdgePruner(GraphNet(MODEL), E.EdgeSelector(1, MODEL.width, 2))


def test_selector_shape_and_symmetry(graphs: GraphBatch) -> None:
    batch = graphs.slice(0, 8)
    selector = fresh_pruner().selector
    logits = selector(batch)
    assert logits.shape == (batch.edge_index.shape[1], 2)
    assert torch.equal(logits, logits[E.reverse_edges(batch)])
    prob = selector.keep_probability(batch)
    assert prob.shape == (batch.edge_index.shape[1],) and bool(((prob > 0) & (prob < 1)).all())


def test_keep_mask_symmetric_deterministic_and_chunked(graphs: GraphBatch) -> None:
    pruner = fresh_pruner()
    with torch.no_grad():  # a mixed mask: shift the keep logit so about half the edges pass
        logits = pruner.selector(graphs)
        pruner.selector.head[-1].bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    batch = graphs.slice(0, 40)
    mask = pruner.keep_mask(batch)
    assert mask.dtype == torch.bool and 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(mask, mask[E.reverse_edges(batch)])
    assert torch.equal(mask, pruner.keep_mask(batch))
    assert torch.equal(mask, pruner.keep_mask(batch, chunk=7))
    logits = pruner.logits(batch, chunk=7)
    assert logits.shape == (40, MODEL.n_classes)
    assert torch.allclose(logits, pruner.classifier(batch.with_edges(mask)), atol=1e-6)


def test_take_graphs_matches_concat_of_slices(graphs: GraphBatch) -> None:
    rows = torch.tensor([5, 0, 5, 17])
    got = E.take_graphs(graphs, rows)
    want = GraphBatch.concat([graphs.slice(int(i), int(i) + 1) for i in rows])
    for f in dataclasses.fields(GraphBatch):
        assert torch.equal(getattr(got, f.name), getattr(want, f.name)), f.name


def test_hard_gumbel_mask_is_binary_samples_keep_probability_and_passes_gradient() -> None:
    logits = torch.zeros(20_000, 2)
    logits[:, 1] = torch.log(torch.tensor(3.0))  # keep probability 0.75
    logits.requires_grad_(True)
    mask = E.hard_gumbel_mask(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.detach().mean().item() - 0.75) < 0.02
    (mask * torch.linspace(-1, 1, mask.numel())).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    again = E.hard_gumbel_mask(logits.detach(), tau=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask.detach(), again)


def test_size_constraint_hand_computed() -> None:
    batch = hand_batch()  # graph 2 has no edges and is left out of the mean
    assert E.size_constraint(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.75, 0.75]), batch, 0.75).item() == 0.0
    loss = E.size_constraint(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), batch, 0.75)
    assert loss.item() == pytest.approx(((1 - 0.75) ** 2 + (0 - 0.75) ** 2) / 2)


def test_probability_alignment_picks_each_graphs_lowest_edges() -> None:
    batch = hand_batch()
    prob = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.45, 0.8], requires_grad=True)
    assert E.alignment_counts(batch, 0.5).tolist() == [2, 1, 0]
    assert E.alignment_counts(batch, 0.1).tolist() == [1, 1, 0]  # at least one edge per graph with edges
    assert E.lowest_edges(prob, batch, 0.5).tolist() == [False, True, False, True, True, False]
    loss = E.probability_alignment(prob, batch, 0.05, 0.5)
    assert loss.item() == pytest.approx(((0.05 + 0.25) / 2 + 0.40) / 2)
    loss.backward()
    assert prob.grad is not None and (prob.grad != 0).tolist() == [False, True, False, True, True, False]
    per_graph_eps = E.probability_alignment(prob.detach(), batch, None, 0.5)  # epsilon = 1 / |E_g|
    assert per_graph_eps.item() == pytest.approx(((0.15 + 0.05) / 2 + 0.05) / 2)


def test_retention_hand_made_mask() -> None:
    batch = hand_batch()
    keep = torch.tensor([True, True, False, False, True, False])
    assert E.retention(batch, keep) == pytest.approx({"motif": 1.0, "base": 0.25, "kept": 0.5})


def test_random_edge_mask_same_per_graph_budget_and_symmetric(graphs: GraphBatch) -> None:
    batch = graphs.slice(0, 50)
    reverse = E.reverse_edges(batch)
    kept = torch.rand(batch.edge_index.shape[1], generator=torch.Generator().manual_seed(1)) < 0.6
    kept = kept[torch.minimum(torch.arange(reverse.numel()), reverse)]  # symmetric
    mask = E.random_edge_mask(batch, kept, seed=3)
    count = lambda m: torch.zeros(len(batch), dtype=torch.long).index_add_(0, batch.edge_graph, m.long())  # noqa: E731
    assert torch.equal(count(mask), count(kept))
    assert torch.equal(mask, mask[reverse])
    assert torch.equal(mask, E.random_edge_mask(batch, kept, seed=3))
    assert not torch.equal(mask, E.random_edge_mask(batch, kept, seed=4))
    assert not torch.equal(mask, kept)


@pytest.fixture(scope="module")
def trained(graphs: GraphBatch, tmp_path_factory: pytest.TempPathFactory):
    """ERM warm-up long enough to leave the log(3) plateau, then PrunE with a strong size constraint."""
    cfg = EdgePruningConfig(warmup_steps=240, steps=90, eta=0.75, lambda_size=10.0, lambda_align=0.1,
                            align_fraction=0.1, lr=3e-3)
    out = tmp_path_factory.mktemp("prune")
    pruner = E.train_edge_pruning(cfg, TRAIN, TRAINED_MODEL, graphs, seed=0, out=out, progress=False)
    return cfg, out, pruner


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def test_training_lowers_loss_and_reaches_the_size_target(trained) -> None:
    cfg, out, _ = trained
    history = E.training_history(out)
    warm = cfg.warmup_steps
    assert [r["step"] for r in history] == list(range(warm + cfg.steps))
    assert {r["phase"] for r in history[:warm]} == {"erm"} and {r["phase"] for r in history[warm:]} == {"prune"}
    assert _mean(history[warm - 15:warm], "ce") < _mean(history[:15], "ce") - 0.25  # ERM warm-up learns
    prune = history[warm:]
    assert _mean(prune[-15:], "loss") < _mean(prune[:15], "loss")  # the PrunE objective goes down
    assert _mean(prune[-15:], "size") < _mean(prune[:5], "size")  # kept ratios move toward eta
    assert abs(_mean(prune[-15:], "kept") - cfg.eta) < 0.1


def test_finished_run_loads_without_training(trained, graphs: GraphBatch, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, out, pruner = trained
    monkeypatch.setattr(E, "_train_step", lambda *a, **k: pytest.fail("a finished run must not train again"))
    again = E.train_edge_pruning(cfg, TRAIN, TRAINED_MODEL, graphs, seed=0, out=out, progress=False)
    loaded = E.load_edge_pruner(out)
    for other in (again, loaded):
        assert E._state_tensors(other).keys() == E._state_tensors(pruner).keys()
        assert all(torch.equal(v, E._state_tensors(pruner)[k]) for k, v in E._state_tensors(other).items())
    batch = graphs.slice(0, 20)
    assert torch.equal(loaded.keep_mask(batch), pruner.keep_mask(batch))


def test_mismatching_config_raises(trained, graphs: GraphBatch) -> None:
    cfg, out, _ = trained
    with pytest.raises(CheckpointError, match="different config"):
        E.train_edge_pruning(dataclasses.replace(cfg, eta=0.5), TRAIN, TRAINED_MODEL, graphs, seed=0, out=out,
                             progress=False)
    with pytest.raises(CheckpointError):
        E.train_edge_pruning(cfg, TRAIN, TRAINED_MODEL, graphs, seed=1, out=out, progress=False)


def test_interrupted_run_resumes_to_the_same_weights(graphs: GraphBatch, tmp_path, monkeypatch) -> None:
    cfg = EdgePruningConfig(warmup_steps=8, steps=17, lr=1e-2)
    whole = E.train_edge_pruning(cfg, TRAIN, MODEL, graphs, seed=2, out=tmp_path / "whole", progress=False)
    step = E._train_step

    def stop_at_23(*args, **kwargs):
        if args[6] == 23:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(E, "_train_step", stop_at_23)
    with pytest.raises(KeyboardInterrupt):
        E.train_edge_pruning(cfg, TRAIN, MODEL, graphs, seed=2, out=tmp_path / "cut", progress=False)
    assert E._read_state(tmp_path / "cut")["step"] == 20 and not E._read_state(tmp_path / "cut")["finished"]
    with pytest.raises(CheckpointError, match="not finished"):
        E.load_edge_pruner(tmp_path / "cut")
    monkeypatch.setattr(E, "_train_step", step)
    resumed = E.train_edge_pruning(cfg, TRAIN, MODEL, graphs, seed=2, out=tmp_path / "cut", progress=False)
    a, b = E._state_tensors(whole), E._state_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert E.training_history(tmp_path / "cut") == E.training_history(tmp_path / "whole")


def test_init_classifier_is_copied_and_skips_the_warm_up(graphs: GraphBatch) -> None:
    torch.manual_seed(5)
    init = GraphNet(MODEL)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    cfg = EdgePruningConfig(warmup_steps=50, steps=3)
    pruner = E.train_edge_pruning(cfg, TRAIN, MODEL, graphs, seed=0, init=init, progress=False)
    assert all(torch.equal(v, init.state_dict()[k]) for k, v in before.items())
    assert not all(torch.equal(v, pruner.classifier.state_dict()[k]) for k, v in before.items())


def test_top_share_mask_keeps_each_graphs_most_probable_edges(graphs: GraphBatch) -> None:
    batch = graphs.slice(0, 12)
    pruner = fresh_pruner()
    p = pruner.selector.keep_probability(batch).detach()
    keep = E.top_share_mask(batch, p, 0.6)
    reverse = E.reverse_edges(batch)
    assert torch.equal(keep, keep[reverse])  # both directions together
    for g in range(len(batch)):
        lo, hi = int(batch.edge_ptr[g]), int(batch.edge_ptr[g + 1])
        n_undirected = (hi - lo) // 2
        assert int(keep[lo:hi].sum()) == 2 * -(-n_undirected * 6 // 10)  # ceil(0.6 n) undirected edges
        if keep[lo:hi].any() and (~keep[lo:hi]).any():
            assert p[lo:hi][keep[lo:hi]].min() >= p[lo:hi][~keep[lo:hi]].max()
    budgeted = dataclasses.replace(pruner, budget=0.6)
    assert torch.equal(budgeted.keep_mask(batch), keep)


def test_erm_only_control_trains_the_classifier_without_masks(graphs: GraphBatch, tmp_path) -> None:
    torch.manual_seed(5)
    init = GraphNet(MODEL)
    cfg = EdgePruningConfig(steps=3)
    control = E.train_edge_pruning(cfg, TRAIN, MODEL, graphs, seed=0, init=init, progress=False,
                                   out=tmp_path / "c", erm_only=True)
    history = E.training_history(tmp_path / "c")
    assert [r["phase"] for r in history] == ["erm"] * 3 and all(r["kept"] == 1.0 for r in history)
    with pytest.raises(CheckpointError):  # the PrunE objective is another training: not resumed from the control
        E.train_edge_pruning(cfg, TRAIN, MODEL, graphs, seed=0, init=init, progress=False, out=tmp_path / "c")
    assert control.classifier is not init
