"""Cross-device gathering (`loss.gather_across_devices=true`) on 2 CPU processes (gloo) equals the
single-process loss on the concatenated global batch: loss, embedding gradients, and the parameter
gradients DDP averages, for the plain step and for GradCache (`loss=gist_cached`).

Workers are started with torch.multiprocessing.spawn; each writes its results to a file the test
compares with the single-process reference computed here.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gist.core.loss_modules import GISTLoss, MNRLLoss, NoGuideLoss
from gist.infra import distributed

WORLD, B, K, D, DG = 2, 4, 2, 8, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        NODE_RANK="0",
        GROUP_RANK="0",
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, Path(out_dir), *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, out_dir: Path, *args) -> None:
    mp.spawn(_entry, args=(fn, _free_port(), str(out_dir), args), nprocs=WORLD, join=True)


# ---- Level 1: the loss on embeddings ------------------------------------------------------------


def _global_embeddings(pairs: bool = False) -> dict:
    """A global batch of WORLD * B rows with cross-rank duplicates and guide vetoes to mask."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * B
    emb = {"anchor": torch.randn(n, D, generator=g), "positive": torch.randn(n, D, generator=g)}
    guide = {"anchor": torch.randn(n, DG, generator=g), "positive": torch.randn(n, DG, generator=g)}
    ids = {"anchor": torch.arange(n), "positive": torch.arange(100, 100 + n)}
    if not pairs:
        emb["negative"] = torch.randn(n, K, D, generator=g)
        guide["negative"] = torch.randn(n, K, DG, generator=g)
        ids["negative"] = torch.arange(200, 200 + n * K).reshape(n, K)
        ids["negative"][1, 0] = ids["positive"][6]  # rank 0 row 1's negative = rank 1 row 2's positive text
    ids["positive"][5] = ids["positive"][0]  # rank 1 row 1 repeats rank 0 row 0's positive text
    guide["positive"][6] = guide["anchor"][1] * 3  # the guide rates rank 1's positive 6 above anchor 1's own
    guide["anchor"][7] = guide["anchor"][2] + 0.01  # near-duplicate anchors across ranks (aa block)
    return {"student": emb, "guide": guide, "ids": ids}


LOSSES = {
    "gist": lambda: GISTLoss(margin=0.05, mask_duplicate_texts=True),
    "gist_self_pairs": lambda: GISTLoss(mask_self_pairs=True, margin_strategy="relative", margin=0.1),
    "no_guide": lambda: NoGuideLoss(mask_duplicate_texts=True),
    "mnrl": lambda: MNRLLoss(mask_duplicate_texts=True),
}


def _loss_on(loss_name: str, data: dict, rows: slice | None, gather: bool):
    """Loss of `rows` of the global batch (None: all of it); returns (loss, stats, leaves)."""
    take = (lambda t: t[rows]) if rows is not None else (lambda t: t)
    leaves = {k: take(v).clone().requires_grad_() for k, v in data["student"].items()}
    guide = {k: take(v) for k, v in data["guide"].items()}
    ids = tuple(take(data["ids"][k]) if k in data["ids"] else None for k in ("anchor", "positive", "negative"))
    loss_fn = LOSSES[loss_name]()
    guide = guide if loss_fn.requires_guide else None
    student, offset = leaves, 0
    if gather:
        student, guide, ids, offset = distributed.gather_for_loss(leaves, guide, ids)
    loss, stats = loss_fn(student, guide, ids, target_offset=offset)
    return loss, stats, leaves


def _embedding_worker(rank: int, out_dir: Path, cases: list) -> None:
    results = {}
    for loss_name, pairs in cases:
        data = _global_embeddings(pairs)
        loss, stats, leaves = _loss_on(loss_name, data, slice(rank * B, (rank + 1) * B), gather=True)
        loss.backward()
        results[f"{loss_name}-{pairs}"] = {
            "loss": loss.detach(),
            "masked_frac": stats["masked_frac"],
            "candidates": stats["candidates"],
            "grads": {k: v.grad for k, v in leaves.items()},
        }
    torch.save(results, out_dir / f"emb-rank{rank}.pt")


CASES = [(name, False) for name in LOSSES] + [("gist", True)]


def test_gathered_loss_and_embedding_gradients_equal_the_global_batch(tmp_path):
    from gist.core.losses import guide_mask

    _spawn(_embedding_worker, tmp_path, CASES)
    ranks = [torch.load(tmp_path / f"emb-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for loss_name, pairs in CASES:
        data = _global_embeddings(pairs)
        ref_loss, ref_stats, ref_leaves = _loss_on(loss_name, data, None, gather=False)
        ref_loss.backward()
        got = [r[f"{loss_name}-{pairs}"] for r in ranks]
        # The global loss is the mean over all anchors = the mean of the ranks' losses (equal B). Both paths
        # compute the same cosines in other matrix shapes: fp32 error < 1e-6 on any CPU, logits = 100 x that,
        # so the loss (~80 here) moves by < 1e-4.
        torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, ref_loss.detach(), rtol=1e-5, atol=1e-4)
        loss_fn = LOSSES[loss_name]()
        if loss_fn.requires_guide:
            # Identical vetoes on both paths, on any CPU: no guide score lies within 1e-5 of its cut-off (25x
            # the fp32 noise of these 6-d cosines); duplicate-text and self-pair masks are exact integer tests.
            gd, kw = data["guide"], loss_fn.kwargs
            veto = guide_mask(
                gd["anchor"],
                gd["positive"],
                gd.get("negative"),
                margin=kw["margin"],
                margin_strategy=kw["margin_strategy"],
            )
            gap = (veto.sim - veto.cutoff).abs()
            gap[torch.arange(WORLD * B), torch.arange(WORLD * B)] = float("inf")  # the targets: never masked
            assert gap.min() > 1e-5, f"{loss_name}: a guide score within 1e-5 of its cut-off; vetoes may flip"
        torch.testing.assert_close(sum(g["masked_frac"] for g in got) / WORLD, ref_stats["masked_frac"])  # same masks
        assert all(g["candidates"] == ref_stats["candidates"] for g in got)  # every rank sees all candidates
        for r, g in enumerate(got):
            for block, grad in g["grads"].items():
                # What DDP would average: rank r's gradient / WORLD is its rows of the global gradient. fp32
                # noise is relative to the largest gradient (logits at 1/T = 100): atol 1e-4 x the block's
                # largest (measured <= 2e-6 x it under default / avx2 / avx512).
                ref = ref_leaves[block].grad[r * B : (r + 1) * B]
                torch.testing.assert_close(
                    grad / WORLD,
                    ref,
                    rtol=1e-4,
                    atol=1e-4 * ref_leaves[block].grad.abs().max().item(),
                    msg=lambda m, block=block, r=r, case=f"{loss_name} pairs={pairs}": f"{case} rank {r} {block}: {m}",
                )
        # The check can fail: without gathering, each rank's in-batch loss differs from the global one.
        local = [_loss_on(loss_name, data, slice(r * B, (r + 1) * B), gather=False)[0] for r in range(WORLD)]
        assert abs(float(sum(local) / WORLD) - float(ref_loss)) > 1e-3
        assert ref_stats["masked_frac"] > 0  # the masks (duplicates, vetoes, self pairs) are exercised


def _uneven_worker(rank: int, out_dir: Path) -> None:
    x = torch.full((rank + 1, 3), float(rank), requires_grad=True)  # rank 0: 1 row, rank 1: 2 rows
    y = distributed.gather_rows(x)
    weights = torch.arange(1.0, 4.0).unsqueeze(1) * (rank + 1)  # each rank's loss weighs rows differently
    (y * weights).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad}, out_dir / f"uneven-rank{rank}.pt")


def test_gather_rows_handles_uneven_ranks_and_sums_gradients_over_ranks(tmp_path):
    _spawn(_uneven_worker, tmp_path)
    out = [torch.load(tmp_path / f"uneven-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected = torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3])
    for o in out:
        torch.testing.assert_close(o["y"], expected)
    # d(sum_r loss_r)/d(row j) = sum_r (r + 1) * (j + 1) = 3 * (j + 1)
    torch.testing.assert_close(out[0]["grad"], torch.full((1, 3), 3.0))
    torch.testing.assert_close(out[1]["grad"], torch.tensor([[6.0] * 3, [9.0] * 3]))


def test_single_process_is_a_no_op():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_rows(x) is x and distributed.rank_and_world() == (0, 1)
    student = {"anchor": x, "positive": x}
    assert distributed.gather_for_loss(student, None, (None, None, None))[3] == 0
    assert distributed.all_ranks_true(False) is False


# ---- Level 2: the Lightning module under DDP, parameter gradients after DDP averaging -------------


def _dropout_free_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _rows(gist_rows: list[dict], rank: int | None) -> list[dict]:
    from gist.data.records import parse_row

    task = [parse_row(r, "x") for r in gist_rows if r["task_name"] == "task-a"][: WORLD * B]
    task[5]["pos"] = task[0]["pos"]  # a duplicate positive text across ranks
    return task if rank is None else task[rank * B : (rank + 1) * B]


def _module(student_dir: str, guide_dir: str, loss_kwargs: dict):
    from gist.core.encoder import Encoder
    from gist.core.module import GISTModule

    loss_kwargs = dict(loss_kwargs)
    cls = {"gist": GISTLoss, "mnrl": MNRLLoss}[loss_kwargs.pop("kind")]
    loss = cls(**loss_kwargs)
    # Mean pooling: the tiny guide's CLS embeddings are all near-parallel (cosines 0.9999..1), leaving guide
    # scores within 3e-7 of their cut-off, where fp32 noise between a rank's 4-row and the reference's 8-row
    # forward may flip vetoes on another CPU; mean-pooled, no score is within 1e-5 (asserted in the test).
    guide = Encoder(guide_dir, pooling="mean") if loss.requires_guide else None
    return GISTModule(Encoder(student_dir), loss, guide, lr=1e-3)


def _collate(module, rows):
    from gist.data.collate import Collator

    guide = module.guide
    return Collator(module.student.inputs, guide.inputs if guide else None)(rows)


def _identity(x):
    return x


def _module_worker(
    rank: int, out_dir: Path, student_dir: str, guide_dir: str, gist_rows: list, scenarios: dict
) -> None:
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: p.grad.clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = outputs["loss"].detach().clone()

    for name, loss_kwargs in scenarios.items():
        torch.manual_seed(0)
        module = _module(student_dir, guide_dir, loss_kwargs)
        batch = _collate(module, _rows(gist_rows, rank))
        capture = Capture()
        trainer = Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy="ddp",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            callbacks=[capture],
        )
        trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=_identity))
        torch.save({"loss": capture.loss, "grads": capture.grads}, out_dir / f"{name}-rank{rank}.pt")


# margin 0: the tiny random guide rates every pair 0.87..1 (mean pooling), so a positive margin soon vetoes
# every candidate (loss 0, zero gradients: a vacuous comparison); at 0 it vetoes ~64% of them (measured).
SCENARIOS = {
    "gist_gather": {"kind": "gist", "gather_across_devices": True, "mask_duplicate_texts": True, "margin": 0.0},
    "gist_cached_gather": {
        "kind": "gist",
        "gather_across_devices": True,
        "mask_duplicate_texts": True,
        "margin": 0.0,
        "mini_batch_size": 3,
    },
    "mnrl_cached_gather": {"kind": "mnrl", "gather_across_devices": True, "mini_batch_size": 2},
    "gist_cached_local": {"kind": "gist", "mini_batch_size": 3},
}


@pytest.mark.slow  # ~60 s on 2 shared cores: two spawned ranks, each fits 4 Lightning runs
def test_ddp_module_gradients_equal_the_single_process_global_batch(tmp_path, tiny_student, tiny_guide, gist_rows):
    """Two DDP ranks, Lightning's DDP strategy on gloo: after DDP's averaging, the parameter gradients
    of one training step with gathering (plain and GradCache) equal those of the single-process step
    on the concatenated batch; GradCache without gathering equals plain DDP (the per-rank losses)."""
    student = _dropout_free_copy(tiny_student, tmp_path / "student")
    _spawn(_module_worker, tmp_path, str(student), str(tiny_guide), gist_rows, SCENARIOS)
    for name, kwargs in SCENARIOS.items():
        got = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
        plain = {k: v for k, v in kwargs.items() if k not in ("mini_batch_size", "gather_across_devices")}
        if kwargs.get("gather_across_devices"):
            refs = [_reference(student, tiny_guide, plain, _rows(gist_rows, None))]
        else:  # no gather: DDP averages the ranks' own in-batch gradients
            refs = [_reference(student, tiny_guide, plain, _rows(gist_rows, r)) for r in range(WORLD)]
        if kwargs["kind"] == "gist":  # the vetoes of both sides agree on any CPU (see _module)
            batches = (
                [_rows(gist_rows, None)]
                if kwargs.get("gather_across_devices")
                else [_rows(gist_rows, r) for r in range(WORLD)]
            )
            for rows in batches:
                gap = _veto_gap(student, tiny_guide, rows, kwargs.get("mask_duplicate_texts", False))
                assert gap > 1e-5, f"{name}: a guide score {gap:.2g} from its cut-off; fp32 noise may flip the veto"
        ref_loss = sum(r[0] for r in refs) / len(refs)
        ref_grads = {n: sum(r[1][n] for r in refs) / len(refs) for n in refs[0][1]}
        # Same function, rows batched per rank or together: fp32 summation order only. Logits are 100 x
        # cosines with error < 1e-6 on any CPU: the loss moves by < 1e-4.
        torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, ref_loss, rtol=1e-5, atol=1e-4)
        assert got[0]["grads"].keys() == ref_grads.keys() and len(ref_grads) > 10
        assert ref_loss > 0.1 and sum(float(g.abs().sum()) for g in ref_grads.values()) > 0  # not vacuous
        scale = max(g.abs().max().item() for g in ref_grads.values())
        for n, ref in ref_grads.items():
            # 1e-4 x the tensor's largest gradient, floored at 1e-5 x the model's largest (fp32 noise scales
            # with the largest terms in backprop; see tests/test_gradcache.py).
            atol = 1e-4 * ref.abs().max().item() + 1e-5 * scale
            for r in range(WORLD):
                torch.testing.assert_close(
                    got[r]["grads"][n],
                    ref,
                    rtol=1e-4,
                    atol=atol,
                    msg=lambda m, n=n, r=r, name=name: f"{name} rank {r} {n}: {m}",
                )


def _veto_gap(student_dir, guide_dir, rows, duplicates_masked: bool) -> float:
    """Smallest |guide score - cut-off| over the candidates whose veto decides the loss (not the targets,
    nor, when duplicate texts are masked anyway, the copies of a row's positive: exact ties)."""
    from gist.core.losses import guide_mask

    module = _module(str(student_dir), str(guide_dir), {"kind": "gist"})
    batch = _collate(module, rows)
    with torch.no_grad():
        g = module._guide_embeddings(batch)
    veto = guide_mask(g["anchor"], g["positive"], g.get("negative"))
    ids = batch.text_ids
    cand = torch.cat(
        [ids["positive"], *([ids["negative"]] if "negative" in ids else []), ids["anchor"], ids["positive"]]
    )
    skip = cand[None, :] == ids["positive"][:, None] if duplicates_masked else torch.zeros_like(veto.mask)
    n = len(rows)
    skip[torch.arange(n), torch.arange(n)] = True  # targets
    return (veto.sim - veto.cutoff).abs().masked_fill(skip, float("inf")).min().item()


def _reference(student_dir, guide_dir, loss_kwargs: dict, rows) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    module = _module(str(student_dir), str(guide_dir), loss_kwargs)
    loss = module.training_step(_collate(module, rows), 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
